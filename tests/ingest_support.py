"""Helpers for the ingest tests: phantom data, a listener on a free port, DCMTK senders, database reads."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import dcmtk
from service.commands import db as db_cli
from service.db.session import make_engine, make_session_factory
from service.db.tables import Instance, Series, SeriesEvent
from service.ingest.listener import Listener
from service.pipeline.tasks import listener_jobs
from service.settings import Settings

# DCMTK's tools, not the pynetdicom console scripts of the same names (service/dcmtk.py).
STORESCU = dcmtk.tool("storescu") or "storescu"
ECHOSCU = dcmtk.tool("echoscu") or "echoscu"

AE_TITLE = "GATEKEEPER"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def upgrade(database_url: str) -> None:
    command.upgrade(db_cli.alembic_config(database_url), "head")


def make_phantom(out: Path, *, slices: int, seed: int, series: int = 1, matrix: int = 128) -> list[Path]:
    """Generate phantom series under `out`; return the series folders."""
    from service.commands.main import main

    assert (
        main(
            [
                "phantom",
                "--out",
                str(out),
                "--series",
                str(series),
                "--slices",
                str(slices),
                "--seed",
                str(seed),
                "--matrix",
                str(matrix),
                "--quiet",
            ]
        )
        == 0
    )
    return sorted(p for p in out.iterdir() if p.is_dir())


def ct_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("CT*.dcm"))


def make_settings(storage_dir: Path, database_url: str, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "storage_dir": storage_dir,
        "database_url": database_url,
        "broker_url": redis_url,
        "port": free_port(),
        "ae_title": AE_TITLE,
        "allowed_ae_titles": ["STORESCU", "ECHOSCU", "TESTSCU"],
        "allowed_networks": ["127.0.0.0/8"],
        "quiet_period_s": 1.5,
        "sweeper_interval_s": 0.2,
        "min_free_disk_bytes": 0,
        "max_disk_used_fraction": 1.0,
        "pipeline_queue": f"test.{storage_dir.name}.{free_port()}",
        # Every queue of its own, so that tests sharing one Redis never take each other's messages.
        "score_queue": f"test.score.{storage_dir.name}.{free_port()}",
        "segment_queue": f"test.segment.{storage_dir.name}.{free_port()}",
        # The rules-only gate (no gate.json there): these tests send short phantoms (12–60 slices)
        # that cover only part of the liver, which the shipped, calibrated gate rightly stops as
        # "liver_partial". A test of the shipped gate passes gate_model_dir itself.
        "gate_model_dir": storage_dir.parent / "rules-only-gate",
    }
    values.update(overrides)
    return Settings(**values)


@contextmanager
def running_listener(settings: Settings, **kwargs: Any) -> Iterator[Listener]:
    if kwargs.get("run_assembler", True) and "publisher" not in kwargs:
        # What `gatekeeper listen` hands its listener: the Celery publisher and the pipeline's sweeper.
        kwargs["publisher"], kwargs["sweepers"] = listener_jobs(settings)
    listener = Listener.start(settings, **kwargs)
    try:
        yield listener
    finally:
        listener.stop()


def storescu(
    port: int, paths: Sequence[Path], *options: str, aet: str = "STORESCU", timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK storescu (verbose, so each response status is printed)."""
    return subprocess.run(
        [STORESCU, "-v", "-aet", aet, "-aec", AE_TITLE, *options, "127.0.0.1", str(port), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def echoscu(port: int, aet: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ECHOSCU, "-aet", aet, "-aec", AE_TITLE, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=30
    )


def wait_for(predicate: Callable[[], Any], timeout: float = 20, interval: float = 0.1) -> Any:
    """Poll `predicate` until it returns something true; return that, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


class Db:
    """Read access to a test database, one short session per call."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.sessions = make_session_factory(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def series(self, series_instance_uid: str | None = None) -> list[Series]:
        with self.sessions() as session:
            query = select(Series).order_by(Series.series_instance_uid, Series.version)
            if series_instance_uid:
                query = query.where(Series.series_instance_uid == series_instance_uid)
            return list(session.scalars(query))

    def instances(self, series_id: int) -> list[Instance]:
        with self.sessions() as session:
            return list(session.scalars(select(Instance).where(Instance.series_id == series_id)))

    def event_kinds(self, series_id: int) -> list[str]:
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(SeriesEvent.kind).where(SeriesEvent.series_id == series_id).order_by(SeriesEvent.id)
                )
            )

    def session(self) -> Session:
        return self.sessions()


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a `gatekeeper` subprocess these settings (secrets included)."""
    import os

    from service.settings import settings_environment

    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEKEEPER_")}
    env.update(settings_environment(settings))
    return env


def gatekeeper_executable() -> str:
    import sys

    return str(Path(sys.executable).parent / "gatekeeper")


@contextmanager
def listener_process(settings: Settings, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`gatekeeper listen` in its own process, ready when its port answers; stopped (if alive) at the end."""
    import socket

    log = log_path.open("ab")
    process = subprocess.Popen(
        [gatekeeper_executable(), "listen"], env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT
    )
    try:

        def port_open() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                socket.create_connection(("127.0.0.1", settings.port), timeout=0.5).close()
                return True
            except OSError:
                return False

        wait_for(port_open, timeout=60)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            # A listener still re-indexing its series folders at start-up stops after that step; on a
            # loaded 2-core machine that can take longer than a quiet one suggests.
            process.wait(timeout=120)
        log.close()


def clone_series(source: Path, out: Path, count: int) -> list[Path]:
    """`count` slices of one new series made from the slices of `source` (new UIDs, consecutive positions).

    The phantom generator takes long for hundreds of slices; the listener does not care about the pixels.
    """
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    templates = [dcmread(p) for p in ct_files(source)]
    out.mkdir(parents=True)
    series_uid = generate_uid()
    spacing = float(templates[0].get("SpacingBetweenSlices", templates[0].SliceThickness))
    origin = [float(v) for v in templates[0].ImagePositionPatient]
    paths = []
    for i in range(count):
        dataset = templates[i % len(templates)]
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.InstanceNumber = i + 1
        dataset.ImagePositionPatient = [origin[0], origin[1], origin[2] - i * spacing]
        dataset.SliceLocation = origin[2] - i * spacing
        path = out / f"CT{i + 1:06d}.dcm"
        dataset.save_as(path)
        paths.append(path)
    return paths
