"""Index rows lost in a crash come back from the series folders (service/ingest/storage.py).

On PostgreSQL, an instance added to a series version already receiving commits without waiting for
the WAL flush; a crash of PostgreSQL (or of the machine) can lose the last of those commits, never
the file. These tests lose such rows on purpose (deleting them, or crashing a PostgreSQL server of
their own) and check that the start-up scan and the check before completion index every
acknowledged instance again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import find_postgres_bin
from ingest_support import (
    Db,
    clone_series,
    ct_files,
    free_port,
    listener_process,
    make_phantom,
    make_settings,
    running_listener,
    storescu,
    upgrade,
    wait_for,
)
from pydicom import dcmread
from sqlalchemy import delete, event, select, update

from service.db.session import make_engine, make_session_factory
from service.db.tables import Instance, Series
from service.ingest.assembly import complete_series
from service.ingest.checks import check_instance
from service.ingest.storage import InstanceStore, StoreOutcome
from service.lifecycle import SeriesState
from service.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small series (6 slices, 128×128), shared read-only by the tests of this module."""
    [folder] = make_phantom(tmp_path_factory.mktemp("phantom"), slices=6, seed=17)
    return folder


@pytest.fixture
def db_url(postgres_db_url: str) -> str:
    upgrade(postgres_db_url)
    return postgres_db_url


@contextmanager
def instance_store(settings: Settings) -> Iterator[InstanceStore]:
    engine = make_engine(settings.database_url)
    store = InstanceStore(
        storage_dir=settings.storage_dir,
        sessions=make_session_factory(engine),
        min_free_disk_bytes=0,
        max_disk_used_fraction=1.0,
    )
    try:
        yield store
    finally:
        store.close()
        engine.dispose()


def lose_index_row(db: Db, series_id: int, sop_instance_uid: str) -> Instance:
    """Delete one instance row and its count: what a commit lost in a crash of PostgreSQL leaves."""
    with db.sessions.begin() as session:
        row = session.scalars(
            select(Instance).where(Instance.series_id == series_id, Instance.sop_instance_uid == sop_instance_uid)
        ).one()
        session.expunge(row)
        session.execute(delete(Instance).where(Instance.id == row.id))
        session.execute(update(Series).where(Series.id == series_id).values(num_instances=Series.num_instances - 1))
    return row


def sop_instance_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_only_instances_added_to_a_receiving_series_commit_without_the_wal_flush(
    tmp_path: Path, db_url: str, redis_url: str, phantom_series: Path
) -> None:
    """Creating a series commits synchronously (nothing rebuilds it); the next instances and a resent one do not."""
    settings = make_settings(tmp_path / "var", db_url, redis_url)
    files = ct_files(phantom_series)[:3]
    with instance_store(settings) as store:
        statements: list[str] = []
        event.listen(
            store.sessions.kw["bind"],
            "before_cursor_execute",
            lambda _conn, _cursor, statement, *_: statements.append(statement),
        )
        skipped_flush = []
        for path in [*files, files[1]]:  # the last one again: a duplicate
            statements.clear()
            file_bytes = path.read_bytes()
            dataset = dcmread(path, stop_before_pixels=True)
            instance = check_instance(
                file_bytes,
                sop_class_uid=str(dataset.SOPClassUID),
                sop_instance_uid=str(dataset.SOPInstanceUID),
                transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
                max_inflated_bytes=settings.max_inflated_bytes,
            )
            result = store.store(
                file_bytes,
                instance=instance,
                transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
                calling_ae_title="TESTSCU",
            )
            skipped_flush.append((result.outcome, any("synchronous_commit" in s for s in statements)))
    assert skipped_flush == [
        (StoreOutcome.STORED, False),
        (StoreOutcome.STORED, True),
        (StoreOutcome.STORED, True),
        (StoreOutcome.DUPLICATE, True),
    ]


def test_start_up_scan_indexes_a_durable_file_whose_index_row_was_lost(
    tmp_path: Path, db_url: str, redis_url: str, phantom_series: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path / "var", db_url, redis_url, quiet_period_s=600)
    files = ct_files(phantom_series)
    db = Db(db_url)
    with running_listener(settings) as listener:
        assert storescu(listener.port, files).returncode == 0
    [series] = db.series()
    lost = lose_index_row(db, series.id, sop_instance_uid(files[-1]))
    assert db.series()[0].num_instances == len(files) - 1

    with caplog.at_level(logging.WARNING, logger="service.ingest.storage"), running_listener(settings):
        # Listener.start returns after the scan: the row is back before anything is received or completed.
        [series] = db.series()
        rows = {row.sop_instance_uid: row for row in db.instances(series.id)}
    assert series.state == SeriesState.RECEIVING and series.num_instances == len(files) == len(rows)
    recovered = rows[lost.sop_instance_uid]
    assert (recovered.relative_path, recovered.sha256, recovered.size_bytes) == (
        lost.relative_path,
        lost.sha256,
        lost.size_bytes,
    )
    assert (recovered.sop_class_uid, recovered.transfer_syntax_uid) == (lost.sop_class_uid, lost.transfer_syntax_uid)
    assert hashlib.sha256((settings.storage_dir / recovered.relative_path).read_bytes()).hexdigest() == lost.sha256
    assert db.event_kinds(series.id).count("recovered_instances") == 1
    assert "indexed 1 durable instance file(s)" in caplog.text
    db.close()


def test_series_is_not_completed_before_its_lost_index_rows_are_back(
    tmp_path: Path, db_url: str, redis_url: str, phantom_series: Path
) -> None:
    settings = make_settings(tmp_path / "var", db_url, redis_url, quiet_period_s=600)
    files = ct_files(phantom_series)
    db = Db(db_url)
    with running_listener(settings, run_assembler=False) as listener:
        assert storescu(listener.port, files).returncode == 0
    [series] = db.series()
    first = lose_index_row(db, series.id, sop_instance_uid(files[0]))
    newest = lose_index_row(db, series.id, sop_instance_uid(files[-1]))
    quiet_until = db.series()[0].last_received_at
    # The newest file arrived after the quiet period's end: indexed, but the series stays open this round.
    later = quiet_until.timestamp() + 5
    os.utime(settings.storage_dir / newest.relative_path, (later, later))
    with instance_store(settings) as store:
        assert not complete_series(store=store, series_id=series.id, reason="quiet_period", quiet_until=quiet_until)
        [series] = db.series()
        assert series.state == SeriesState.RECEIVING and series.num_instances == len(files)
        assert series.last_received_at.timestamp() == pytest.approx(later)

        last = lose_index_row(db, series.id, sop_instance_uid(files[-1]))
        assert complete_series(store=store, series_id=series.id, reason="forced")
    [series] = db.series()
    assert series.state == SeriesState.COMPLETE and series.num_instances == len(files)
    indexed = {row.sop_instance_uid for row in db.instances(series.id)}
    assert {first.sop_instance_uid, last.sop_instance_uid} <= indexed and len(indexed) == len(files)
    assert db.event_kinds(series.id).count("recovered_instances") == 2
    db.close()


def test_a_file_that_is_not_an_instance_of_the_series_is_left_unindexed(
    tmp_path: Path, db_url: str, redis_url: str, phantom_series: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path / "var", db_url, redis_url, quiet_period_s=600)
    files = ct_files(phantom_series)
    other = clone_series(phantom_series, tmp_path / "other", 1)[0]  # another series' instance
    db = Db(db_url)
    with running_listener(settings, run_assembler=False) as listener:
        assert storescu(listener.port, files[:2]).returncode == 0
    [series] = db.series()
    folder = settings.storage_dir / Path(db.instances(series.id)[0].relative_path).parent
    (folder / "1.2.3.dcm").write_bytes(b"not DICOM at all")
    shutil.copy(other, folder / f"{sop_instance_uid(other)}.dcm")
    shutil.copy(files[2], folder / "1.2.4.dcm")  # an instance of this series under another SOP's name
    with caplog.at_level(logging.WARNING, logger="service.ingest.storage"), instance_store(settings) as store:
        assert store.recover_unindexed_files() == 0
    assert len(db.instances(series.id)) == 2 and db.series()[0].num_instances == 2
    assert caplog.text.count("not indexed") == 3
    db.close()


# -- A real crash of PostgreSQL -------------------------------------------------------------------


@contextmanager
def crashable_postgres() -> Iterator[tuple[str, Callable[[], None]]]:
    """A PostgreSQL server of our own, and a function that crashes and restarts it.

    The WAL writer waits 10 s between rounds, so the commits made without a WAL flush in the last
    seconds are still in memory when the server is stopped in immediate mode (a crash: no
    checkpoint, no final WAL write), and are lost.
    """
    bindir = find_postgres_bin()
    workdir = Path(tempfile.mkdtemp(prefix="gatekeeper-pg-crash-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        account = pwd.getpwnam("postgres")
        os.chown(workdir, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = workdir / "data", free_port()
    pg_ctl = [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(workdir / "log")]
    options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c wal_writer_delay=10000"

    def run(*args: str) -> None:
        subprocess.run([*pg_ctl, *args], check=True, capture_output=True, timeout=120)

    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"],
        check=True,
        capture_output=True,
    )
    run("-o", options, "-w", "start")

    def crash_and_restart() -> None:
        run("-m", "immediate", "-w", "stop")
        run("-o", options, "-w", "start")

    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", crash_and_restart
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], check=False, capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


def test_postgres_crash_loses_no_acknowledged_instance(tmp_path: Path, redis_url: str, phantom_series: Path) -> None:
    files = clone_series(phantom_series, tmp_path / "series", 40)
    with crashable_postgres() as (db_url, crash_and_restart):
        upgrade(db_url)
        settings = make_settings(tmp_path / "var", db_url, redis_url, quiet_period_s=600)
        db = Db(db_url)
        with listener_process(settings, tmp_path / "listener1.log"):
            sent = storescu(settings.port, files)
            assert sent.returncode == 0, sent.stdout[-2000:] + sent.stderr[-2000:]
            crash_and_restart()
            db.engine.dispose()
            indexed_after_crash = len(db.instances(db.series()[0].id))
        # Commits made without the WAL flush in the last seconds before the crash are gone...
        assert indexed_after_crash < len(files)
        # ...and come back from the series folder when the listener starts again.
        with listener_process(settings, tmp_path / "listener2.log"):
            [series] = wait_for(lambda: db.series(), timeout=60)
            rows = db.instances(series.id)
        assert len(rows) == series.num_instances == len(files)
        assert {row.sop_instance_uid for row in rows} == {sop_instance_uid(path) for path in files}
        assert series.state == SeriesState.RECEIVING
        db.close()
