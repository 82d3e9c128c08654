"""A long PACS outage on a compressed clock, and the order exports go out in afterwards.

The export retry schedule is three settings (`export_retry_initial_s`, doubling up to
`export_retry_max_s`, given up after `export_retry_deadline_s`). The integration test runs the
production schedule (30 s, 3600 s, 48 h) divided by `COMPRESSION` = 360: one second of the test is
six minutes of the real clock, and the one-hour outage lasts 10 s. Orthanc (the PACS) is down while
three normal series go through the real pipeline (listener and worker in their own processes); when
it comes back every SEG is delivered exactly once, in the order the series completed, and the
failed list is empty. A PACS that refuses our AE title permanently still fails an export at the
first attempt. Unit tests (SQLite, a stand-in for the network) pin the waiting line itself.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import redis
from ingest_support import (
    Db,
    clone_series,
    ct_files,
    free_port,
    gatekeeper_executable,
    listener_process,
    make_settings,
    settings_env,
    storescu,
    upgrade,
    wait_for,
)
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select
from test_e2e_pipeline import process
from test_pacs_export import fake_send, make_due, orthanc, unit_settings

from service.db.tables import Export, ExportAttempt, ExportState, Series, SeriesEvent
from service.dicom_send import Outcome
from service.lifecycle import SeriesState
from service.pacs_export import WAITING_REASON, deliver, next_in_line, record_export

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: One second of the test's schedule stands for this many seconds of the real clock.
COMPRESSION = 360
#: The production defaults (service/settings.py), compressed.
SCHEDULE = {
    "export_retry_initial_s": 30 / COMPRESSION,
    "export_retry_max_s": 3600 / COMPRESSION,
    "export_retry_deadline_s": 48 * 3600 / COMPRESSION,
}
OUTAGE_S = 3600 / COMPRESSION  # one hour
SERIES, SLICES = 3, 12


# --- the waiting line (SQLite, no network) -----------------------------------------------------------


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[Any]:
    url = f"sqlite:///{tmp_path / 'gatekeeper.db'}"
    upgrade(url)
    db = Db(url)
    yield db.sessions
    db.close()


def seg_file(folder: Path, name: str) -> Path:
    """A header-only stand-in for a SEG file: all `record_export` reads is its SOP Class and Instance UID."""
    dataset = pydicom.Dataset()
    dataset.SOPClassUID = SEG_STORAGE
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = SEG_STORAGE
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def export_row(sessions: Any, export_id: int) -> Export:
    with sessions() as session:
        row = session.get(Export, export_id)
        assert row is not None
        return row


def test_exports_wait_behind_one_whose_pacs_was_not_reached_and_go_in_order(tmp_path: Path, sessions: Any) -> None:
    settings = unit_settings(tmp_path)
    first, second, third = (
        record_export(sessions=sessions, settings=settings, path=seg_file(tmp_path, name))[0]
        for name in ("first", "second", "third")
    )
    down = fake_send(Outcome.TRANSIENT, None, "cannot connect to 127.0.0.1:104")
    assert deliver(sessions=sessions, settings=settings, export_id=first, send=down).retry_after_s == 30
    # The PACS is down: the later ones are not sent, they line up behind the first.
    for later in (second, third):
        waiting = deliver(sessions=sessions, settings=settings, export_id=later, send=down)
        assert not waiting.attempted and waiting.waiting_for == first and waiting.retry_after_s is None
        assert export_row(sessions, later).last_reason.startswith(f"{WAITING_REASON}{first} ")
    assert len(down.calls) == 1
    assert next_in_line(sessions=sessions, export_id=first) is None  # it still holds the line

    # Its retry gets through; the line is handed on one export at a time, in order.
    make_due(sessions, first)
    up = fake_send(Outcome.DELIVERED, 0x0000)
    assert deliver(sessions=sessions, settings=settings, export_id=first, send=up).state == ExportState.DELIVERED
    assert next_in_line(sessions=sessions, export_id=first) == second
    assert deliver(sessions=sessions, settings=settings, export_id=second, send=up).state == ExportState.DELIVERED
    assert next_in_line(sessions=sessions, export_id=second) == third
    assert deliver(sessions=sessions, settings=settings, export_id=third, send=up).state == ExportState.DELIVERED
    assert next_in_line(sessions=sessions, export_id=third) is None
    assert len(up.calls) == 3
    assert [export_row(sessions, e).attempts for e in (first, second, third)] == [2, 1, 1]
    assert export_row(sessions, second).last_reason is None  # the waiting note went with the send


def test_a_refusal_with_a_status_holds_nobody_back(tmp_path: Path, sessions: Any) -> None:
    """The PACS answered about one object (0xA700): a later export still goes at once."""
    settings = unit_settings(tmp_path)
    first, second = (
        record_export(sessions=sessions, settings=settings, path=seg_file(tmp_path, name))[0]
        for name in ("first", "second")
    )
    busy = fake_send(Outcome.TRANSIENT, 0xA700, "0xA700 refused: out of resources")
    assert deliver(sessions=sessions, settings=settings, export_id=first, send=busy).retry_after_s == 30
    up = fake_send(Outcome.DELIVERED, 0x0000)
    assert deliver(sessions=sessions, settings=settings, export_id=second, send=up).state == ExportState.DELIVERED
    assert export_row(sessions, first).state == ExportState.PENDING


def test_an_export_whose_blocker_settled_meanwhile_is_sent(tmp_path: Path, sessions: Any) -> None:
    """A waiting export that nobody woke (its message lost) goes when the sweeper re-sends it."""
    settings = unit_settings(tmp_path)
    first, second = (
        record_export(sessions=sessions, settings=settings, path=seg_file(tmp_path, name))[0]
        for name in ("first", "second")
    )
    down = fake_send(Outcome.TRANSIENT, None, "association aborted, or no answer within 5 s")
    deliver(sessions=sessions, settings=settings, export_id=first, send=down)
    assert deliver(sessions=sessions, settings=settings, export_id=second, send=down).waiting_for == first
    make_due(sessions, first)
    deliver(sessions=sessions, settings=settings, export_id=first, send=fake_send(Outcome.DELIVERED, 0))
    # No hand-on: the sweeper's re-send (overdue) finds nobody ahead any more.
    make_due(sessions, second)
    up = fake_send(Outcome.DELIVERED, 0)
    assert deliver(sessions=sessions, settings=settings, export_id=second, send=up).state == ExportState.DELIVERED


# --- one hour of outage, compressed, through the real pipeline ---------------------------------------


def phantom_series(out: Path, *, seed: int, slices: int, anomaly: str | None = None, matrix: int = 128) -> Path:
    """The series `gatekeeper phantom --series 1 --seed SEED --slices SLICES --matrix 128` makes; its folder."""
    from service.phantom.generate import DEFAULT_NOISE_SIGMA, generate_series, series_specs

    [spec] = series_specs(
        count=1, seed=seed, num_slices=slices, anomaly=anomaly, matrix=matrix, noise_sigma=DEFAULT_NOISE_SIGMA
    )
    generate_series(spec, out)
    return out / spec.folder


def series_uid(folder: Path) -> str:
    return str(pydicom.dcmread(ct_files(folder)[0], stop_before_pixels=True).SeriesInstanceUID)


@pytest.mark.integration
@pytest.mark.slow
def test_one_hour_pacs_outage_ends_with_every_seg_delivered_once_in_order(
    tmp_path: Path, postgres_db_url: str, redis_url: str
) -> None:
    upgrade(postgres_db_url)
    source = phantom_series(tmp_path / "phantom", slices=SLICES, seed=5)  # a normal series the shipped gate passes
    folders = [source]
    for n in range(1, SERIES):
        clone_series(source, tmp_path / f"clone{n}", SLICES)
        folders.append(tmp_path / f"clone{n}")
    db = Db(postgres_db_url)

    def rows(uid: str) -> list[Series]:
        return db.series(uid)

    def state(uid: str) -> str | None:
        found = rows(uid)
        return found[-1].state if found else None

    def exports() -> list[Export]:
        with db.sessions() as session:
            return list(session.scalars(select(Export).order_by(Export.id)))

    def attempts(export_id: int) -> list[ExportAttempt]:
        with db.sessions() as session:
            return list(
                session.scalars(
                    select(ExportAttempt).where(ExportAttempt.export_id == export_id).order_by(ExportAttempt.id)
                )
            )

    with orthanc(tmp_path / "orthanc") as pacs:  # not started: the PACS is down from the start
        settings = make_settings(
            tmp_path / "var",
            postgres_db_url,
            redis_url,
            pacs_host="127.0.0.1",
            pacs_port=pacs.dicom_port,
            pacs_ae_title="ORTHANC",
            export_timeout_s=5,
            export_queue=f"test.export.{tmp_path.name}.{free_port()}",
            **SCHEDULE,
        )
        with (
            listener_process(settings, tmp_path / "listener.log"),
            process([gatekeeper_executable(), "worker"], settings, tmp_path / "worker.log"),
        ):
            # The series, one after the other: each complete before the next is sent.
            uids = []
            for folder in folders:
                sent = storescu(settings.port, ct_files(folder))
                assert sent.returncode == 0, sent.stdout[-2000:] + sent.stderr[-2000:]
                uids.append(series_uid(folder))
                wait_for(lambda: state(uids[-1]) not in (None, SeriesState.RECEIVING), timeout=60, interval=0.2)
            # Each SEG is written, and tried (the first) or lined up behind it (the others).
            wait_for(
                lambda: (
                    all(state(uid) == SeriesState.EXPORTING for uid in uids)
                    and len(found := exports()) == SERIES
                    and all(e.attempts or (e.last_reason or "").startswith(WAITING_REASON) for e in found)
                ),
                timeout=240,
                interval=0.5,
            )
            with db.sessions() as session:
                outage_began = session.scalar(select(ExportAttempt.started_at).order_by(ExportAttempt.id).limit(1))
            assert outage_began is not None
            while (elapsed := _seconds_since(outage_began)) < OUTAGE_S:
                time.sleep(min(0.5, OUTAGE_S - elapsed))
            pacs.start()
            outage_s = _seconds_since(outage_began)
            wait_for(lambda: all(state(uid) == SeriesState.DELIVERED for uid in uids), timeout=120, interval=0.5)

            completed = [rows(uid)[-1] for uid in uids]
            assert all(len(rows(uid)) == 1 for uid in uids)
            by_series = {e.series_id: e for e in exports()}
            in_completion_order = [by_series[s.id] for s in sorted(completed, key=lambda s: s.completed_at)]
            assert [s.series_instance_uid for s in sorted(completed, key=lambda s: s.completed_at)] == uids

            # Exactly once: one successful attempt each, one instance each in the PACS.
            for export in in_completion_order:
                outcomes = [a.outcome for a in attempts(export.id)]
                assert outcomes.count("delivered") == 1 and outcomes[-1] == "delivered", outcomes
                assert len(pacs.instances_with_uid(export.sop_instance_uid)) == 1
            assert len(pacs.rest("/instances")) == SERIES  # the SEGs, nothing twice

            # The first kept retrying through the hour (at the real schedule's times); the others waited.
            head, *rest = in_completion_order
            head_attempts = attempts(head.id)
            assert {a.outcome for a in head_attempts[:-1]} == {"transient"} and len(head_attempts) >= 4
            assert all(a.reason.startswith("cannot connect to ") for a in head_attempts[:-1])
            assert [len(attempts(e.id)) for e in rest] == [1] * (SERIES - 1)

            # In order: our receipts, and the PACS's own log of what arrived.
            delivered_at = [attempts(e.id)[-1].started_at for e in in_completion_order]
            assert delivered_at == sorted(delivered_at)
            changes = pacs.rest("/changes?limit=1000")["Changes"]
            arrived = [
                pacs.rest(f"/instances/{c['ID']}/simplified-tags")["SOPInstanceUID"]
                for c in changes
                if c["ChangeType"] == "NewInstance" and c["ResourceType"] == "Instance"
            ]
            assert arrived == [e.sop_instance_uid for e in in_completion_order]

            # The failed list is empty.
            listed = _gatekeeper(settings, "exports", "list", "--state", "failed", "--json")
            assert json.loads(listed) == []
            with db.sessions() as session:
                kinds = list(session.scalars(select(SeriesEvent.kind).where(SeriesEvent.kind == "delivered")))
            assert len(kinds) == SERIES

            # A PACS that refuses our AE title permanently: failed at the first attempt, no retry.
            pacs.stop()
            pacs.start(DicomAlwaysAllowStore=False, DicomAlwaysAllowEcho=False)
            another = pydicom.dcmread(settings.storage_dir / head.path)  # a new object: the same SEG, new UID
            another.SOPInstanceUID = another.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            another.save_as(tmp_path / "another.seg.dcm", enforce_file_format=True)
            _gatekeeper(settings, "exports", "send", str(tmp_path / "another.seg.dcm"))  # queued for the worker
            failed = wait_for(
                lambda: next((e for e in exports() if e.state == ExportState.FAILED), None), timeout=60, interval=0.2
            )
            [attempt] = attempts(failed.id)
            assert attempt.outcome == "permanent" and attempt.reason.startswith("association rejected permanently")
            time.sleep(3 * SCHEDULE["export_retry_initial_s"] + 1)  # several backoff steps: no second attempt
            assert len(attempts(failed.id)) == 1
            listed = _gatekeeper(settings, "exports", "list", "--state", "failed", "--json")
            assert [row["id"] for row in json.loads(listed)] == [failed.id]
    print(
        f"outage {outage_s:.1f} s at 1:{COMPRESSION} = {outage_s * COMPRESSION / 3600:.2f} h; "
        f"first export tried {len(head_attempts)} times; delivered in completion order"
    )
    broker = redis.Redis.from_url(redis_url)
    for name in (settings.score_queue, settings.segment_queue, settings.export_queue, settings.pipeline_queue):
        broker.delete(name)
    db.close()


def _seconds_since(moment: Any) -> float:
    from service.db.tables import utc_now

    return (utc_now() - moment).total_seconds()


def _gatekeeper(settings: Any, *args: str) -> str:
    done = subprocess.run(
        [gatekeeper_executable(), *args], env=settings_env(settings), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
