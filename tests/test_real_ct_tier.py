"""Real-CT tier: both real series of `../shared/realct/` pushed through `gatekeeper serve`, as a new user would.

`gatekeeper serve` (listener, worker and, here, no web app) on its single-machine defaults — SQLite
database and broker under the storage folder — with the shipped detector, segmenter and gate; DCMTK
`storescu -xv` sends each series, proposing JPEG 2000 lossless (what the Siemens series is encoded
in; the slab is converted by storescu on the way). Each series must end in a final state with its
reasons in words — never a stage error, never "unreadable". Both are slabs that cut the liver at
both ends (see the cases' README), so the gate must stop them for a person and say so.

The cases are evaluation data: this test reads them and trains or tunes nothing on them.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from ingest_support import AE_TITLE, Db, free_port, gatekeeper_executable, settings_env, storescu, wait_for
from realct_support import REALCT_CASES, realct_case
from sqlalchemy import select

from service.db.tables import WorklistItem
from service.lifecycle import FINAL_STATES, SeriesState
from service.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@contextmanager
def serving(settings: Settings, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`gatekeeper serve --no-web` in its own process group, ready when its DICOM port answers."""
    import socket

    log = log_path.open("ab")
    command = [gatekeeper_executable(), "serve", "--no-web", "--allow-ae", "STORESCU", "--allow-ip", "127.0.0.0/8"]
    child = subprocess.Popen(command, env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT)
    try:

        def port_open() -> bool:
            assert child.poll() is None, log_path.read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", settings.port), timeout=0.5).close()
                return True
            except OSError:
                return False

        wait_for(port_open, timeout=120, interval=0.25)
        yield child
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)  # serve stops its children
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        log.close()


def test_both_real_ct_series_end_in_a_final_state_with_their_reasons(tmp_path: Path) -> None:
    settings = Settings(
        storage_dir=tmp_path / "var",
        port=free_port(),
        ae_title=AE_TITLE,
        quiet_period_s=2.0,
        sweeper_interval_s=0.5,
        pipeline_sweep_interval_s=2,
        web_port=free_port(),
    )
    uids = {}
    with serving(settings, tmp_path / "serve.log"):
        for case in REALCT_CASES:
            files = sorted((realct_case(case) / "ct").glob("*.dcm"))
            uids[case] = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            sent = storescu(settings.port, files, "-xv")
            output = sent.stdout + sent.stderr
            assert sent.returncode == 0 and output.count("Received Store Response (Success)") == len(files), output
        db = Db(settings.database_url)
        try:

            def final() -> bool:
                rows = {case: db.series(uid) for case, uid in uids.items()}
                return all(r and r[-1].state in FINAL_STATES for r in rows.values())

            # Generous: the worker loads three models, then scores, segments and assesses 50 real slices
            # on a loaded 2-core machine.
            wait_for(final, timeout=600, interval=1.0)
            for case, uid in uids.items():
                [row] = db.series(uid)
                with db.sessions() as session:
                    items = session.scalars(select(WorklistItem).where(WorklistItem.series_id == row.id)).all()
                assert row.state == SeriesState.WORKLISTED, (case, row.state, row.route_reason)
                [item] = items
                assert item.reason == row.route_reason and item.reason not in ("unreadable", "cannot_segment"), case
                fired = {f["signal"]: f["words"] for f in item.detail["gate"]["findings"] if f["fired"]}
                # A slab that cuts the liver at both ends: the gate says so, in words.
                assert "liver_partial" in fired and "only partly covered" in fired["liver_partial"], (case, fired)
                assert all(words.strip() for words in fired.values())
                assert item.detail["draft"] is not None  # the liver it found, kept for the person, never sent
        finally:
            db.close()
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log, log[-5000:]
    for case in REALCT_CASES:  # no patient data in the logs
        header = pydicom.dcmread(next((realct_case(case) / "ct").glob("*.dcm")), stop_before_pixels=True)
        assert str(header.PatientName) not in log and str(header.PatientID) not in log
    assert os.path.isdir(settings.storage_dir)
