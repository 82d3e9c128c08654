"""Durable storage of received instances: temporary file, fsync, rename, database index.

Layout under `Settings.storage_dir`:

- `tmp/`: files being written; anything left here after a crash was never acknowledged.
- `dicom/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`: stored instances.
- `quarantine/<SOPInstanceUID>.<sha256>.dcm`: instances received again with different bytes.

`InstanceStore.store` returns only after the file is fsynced, renamed into place (the folder
fsynced too) and the database transaction that indexes it has committed, in that order. The two
syncs run in a writer thread while the database works: the file's while the series version is
found and locked, the folder's while the rows are written; the commit waits for both. A file
renamed into place whose transaction then failed is an unacknowledged orphan: complete and synced,
but nothing in the database points to it until the sender's retry writes the same path again (or
the folder scan below indexes it, which is what the retry would do).

The series folder is the durable record; the index can be rebuilt from it. On PostgreSQL, the
transaction that adds an instance to a series version already receiving (the common case: every
instance but the first of a series) commits with `synchronous_commit = off`: it is visible at once
and written to the WAL within a fraction of a second, but the answer does not wait for that flush.
Only a crash of PostgreSQL or of the machine can lose such a commit (a killed listener cannot), and
then the lost commits are the last ones, after every synchronous commit (the WAL is one sequence).
What a lost commit leaves is a complete, synced file in the folder of a series version still
receiving, which `InstanceStore.index_unindexed_files` indexes again: at start-up for every series
receiving (`recover_unindexed_files`) and, under the series lock, before a series is completed
(`service.ingest.assembly.complete_series`), so no series is completed without an instance that
was acknowledged. Creating a series or a new version, and quarantining, commit synchronously: their
rows are not rebuilt from the folder.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import shutil
import struct
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from sqlalchemy import Connection, bindparam, insert, literal, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import Instance, QuarantinedInstance, Series, SeriesEvent, utc_now
from service.ingest.checks import CheckedInstance
from service.lifecycle import INITIAL_STATE, SeriesState

log = logging.getLogger(__name__)

# Concurrent first instances of one new series race to create it; the loser retries this often.
_INDEX_ATTEMPTS = 5
# PostgreSQL: this transaction's commit does not wait for its WAL flush (see the module docstring).
_COMMIT_WITHOUT_FLUSH = text("SET LOCAL synchronous_commit TO OFF")

# The statements of every instance, built once: building a Core statement (and its cache key) costs
# more CPU than running it. Their parameters are the `bindparam` names.
# The latest version of a series, locked, with the checksum of one SOP instance if it has it.
_LATEST_VERSION = (
    select(Series.id, Series.version, Series.state, Series.study_instance_uid, Instance.sha256)
    .outerjoin(
        Instance,
        (Instance.series_id == Series.id) & (Instance.sop_instance_uid == bindparam("sop_instance_uid")),
    )
    .where(Series.series_instance_uid == bindparam("series_instance_uid"))
    .order_by(Series.version.desc())
    .limit(1)
    .with_for_update(of=Series)
)
_INSTANCE_COLUMNS = (
    "series_id",
    "sop_instance_uid",
    "sop_class_uid",
    "transfer_syntax_uid",
    "relative_path",
    "sha256",
    "size_bytes",
    "received_at",
)
# One more instance in a series version: its row (parameters `new_<column>`), then the count.
_ADD_INSTANCE = insert(Instance).values({column: bindparam(f"new_{column}") for column in _INSTANCE_COLUMNS})
_COUNT_INSTANCE = (
    update(Series)
    .where(Series.id == bindparam("new_series_id"))
    .values(num_instances=Series.num_instances + 1, last_received_at=bindparam("new_received_at"))
)
# PostgreSQL runs an INSERT inside WITH: both in one statement, one round trip.
_ADD_AND_COUNT_INSTANCE = _COUNT_INSTANCE.add_cte(_ADD_INSTANCE.cte("new_instance"))


class StoreOutcome(StrEnum):
    """What `InstanceStore.store` did with an instance; each is acknowledged with success."""

    STORED = "stored"  # new in its series version: written and indexed
    DUPLICATE = "duplicate"  # same SOP Instance UID and identical bytes as stored: nothing written
    QUARANTINED = "quarantined"  # same SOP Instance UID, different bytes: kept under quarantine/


class DiskReserveReached(Exception):
    """Free space on the storage disk is under the configured reserve."""


@dataclass(frozen=True)
class StoreResult:
    """The outcome, and the ids of the series version and (for STORED) the instance row."""

    outcome: StoreOutcome
    series_id: int
    series_version: int


def part10_file(dataset_bytes: bytes, *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """The DICOM file (PS3.10) of a data set as received: preamble, `DICM`, File Meta Information, data set.

    The same bytes as pynetdicom's `Event.encoded_dataset(include_meta=True)`, without building
    a pydicom data set for the meta information (a measurable share of the CPU per instance).
    """
    elements = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _ui(sop_class_uid)),
            _meta_element(0x0003, b"UI", _ui(sop_instance_uid)),
            _meta_element(0x0010, b"UI", _ui(transfer_syntax_uid)),
            _meta_element(0x0012, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID)),
            _meta_element(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" ")),
        )
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(elements)))
    return b"".join((b"\x00" * 128, b"DICM", group_length, elements, dataset_bytes))


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _ui(uid: str) -> bytes:
    return _even(str(uid).encode("ascii"), b"\x00")


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def fsync_directory(path: Path) -> None:
    """Make a rename or creation inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class InstanceStore:
    """Writes received instances durably and indexes them; built once per listener process.

    On SQLite, writes of all threads are serialized by a lock, because SQLite has a single writer
    and a transaction that reads before it writes cannot wait for it (it fails instead).
    """

    def __init__(
        self,
        *,
        storage_dir: Path,
        sessions: sessionmaker[Session],
        min_free_disk_bytes: int,
        max_disk_used_fraction: float,
    ) -> None:
        self.storage_dir = storage_dir.resolve()
        self.sessions = sessions
        self.min_free_disk_bytes = min_free_disk_bytes
        self.max_disk_used_fraction = max_disk_used_fraction
        self.tmp_dir = self.storage_dir / "tmp"
        for folder in (self.tmp_dir, self.storage_dir / "dicom", self.storage_dir / "quarantine"):
            folder.mkdir(parents=True, exist_ok=True)
        # Writes temporary files while the handler's thread talks to the database.
        self._writer = ThreadPoolExecutor(max_workers=8, thread_name_prefix="instance-writer")
        dialect = sessions.kw["bind"].dialect.name
        self._write_lock: threading.Lock | None = threading.Lock() if dialect == "sqlite" else None
        # Commits that the folder can rebuild skip their WAL flush (PostgreSQL; SQLite always flushes).
        self._commit_without_flush = dialect == "postgresql"
        # PostgreSQL: the instance row and its count in one statement (_ADD_AND_COUNT_INSTANCE).
        self._one_statement_index = dialect == "postgresql"

    def close(self) -> None:
        """Wait for pending file writes and stop the writer threads."""
        self._writer.shutdown(wait=True)

    def write_lock(self) -> AbstractContextManager[object]:
        """The lock to hold around a database write transaction (SQLite only; a no-op otherwise)."""
        return self._write_lock if self._write_lock is not None else nullcontext()

    def check_disk_reserve(self) -> None:
        """Raises DiskReserveReached when the storage disk is fuller than the configured reserve."""
        usage = shutil.disk_usage(self.storage_dir)
        if usage.free < self.min_free_disk_bytes:
            raise DiskReserveReached(f"{usage.free} bytes free; reserve is {self.min_free_disk_bytes}")
        if usage.used / usage.total > self.max_disk_used_fraction:
            raise DiskReserveReached(f"{usage.used / usage.total:.1%} used; limit is {self.max_disk_used_fraction:.0%}")

    def start_write(self, file_bytes: bytes) -> Future[Path]:
        """Start writing and syncing `file_bytes` to a temporary file, in a writer thread.

        For a caller that checks the data set meanwhile: hand the future to `store`, or to
        `discard` if the instance is refused.
        """
        return self._writer.submit(self._write_temporary, file_bytes)

    def discard(self, writing: Future[Path]) -> None:
        """Cancel a write started by `start_write`, or wait for it and delete its temporary file."""
        if writing.cancel():
            return
        try:
            writing.result().unlink(missing_ok=True)
        except OSError:
            log.exception("could not write or delete the temporary file of a refused instance")

    def store(
        self,
        file_bytes: bytes,
        *,
        instance: CheckedInstance,
        transfer_syntax_uid: str,
        calling_ae_title: str,
        writing: Future[Path] | None = None,
    ) -> StoreResult:
        """Write `file_bytes` durably and index the instance, all before returning.

        `writing` is the write of these bytes already started with `start_write`, if any.

        Raises:
            OSError: the file could not be written, synced or renamed.
            sqlalchemy.exc.SQLAlchemyError: the database did not commit the index.
        """
        # The temporary file is written and synced while the database finds the series (the slow
        # parts overlap); it is renamed into place and indexed only once synced.
        if writing is None:
            writing = self.start_write(file_bytes)
        sha256 = hashlib.sha256(file_bytes).hexdigest()
        try:
            for attempt in range(1, _INDEX_ATTEMPTS + 1):
                try:
                    with self.write_lock(), self.sessions.begin() as session:
                        return self._index(
                            session,
                            writing=writing,
                            instance=instance,
                            sha256=sha256,
                            size_bytes=len(file_bytes),
                            transfer_syntax_uid=transfer_syntax_uid,
                            calling_ae_title=calling_ae_title,
                        )
                except IntegrityError:
                    # Another association created the same series (version) first; look again.
                    if attempt == _INDEX_ATTEMPTS:
                        raise
                    log.info("series %s created concurrently; retrying index", instance.series_instance_uid)
            raise AssertionError("unreachable")
        finally:
            # Still here only if not renamed into place. result() re-raises a failed write (OSError).
            writing.result().unlink(missing_ok=True)

    def _write_temporary(self, file_bytes: bytes) -> Path:
        path = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(file_bytes)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return path

    def _place(self, tmp_path: Path, relative_path: str) -> Future[None]:
        """Rename the synced temporary file to `relative_path`; its folder is synced in a writer thread.

        The future is done once the rename is durable: wait for it before the commit that makes the
        file's row visible (its `result()` re-raises a failed sync, an OSError).
        """
        target = self.storage_dir / relative_path
        if not target.parent.is_dir():
            self._make_directories(target.parent)
        # Replacing is safe: the database has no row for this path in this series version (checked
        # under the series lock), so a file already there is an unacknowledged orphan.
        os.replace(tmp_path, target)
        return self._writer.submit(fsync_directory, target.parent)

    def _make_directories(self, folder: Path) -> None:
        """Create `folder` and its missing parents durably (each new entry's parent is synced)."""
        missing = []
        while not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
            fsync_directory(path.parent)

    def _index(
        self,
        session: Session,
        *,
        writing: Future[Path],
        instance: CheckedInstance,
        sha256: str,
        size_bytes: int,
        transfer_syntax_uid: str,
        calling_ae_title: str,
    ) -> StoreResult:
        # Core statements on the hot path: the ORM's unit of work costs more CPU than the queries.
        now = utc_now()
        connection = session.connection()
        latest = connection.execute(
            _LATEST_VERSION,
            {"sop_instance_uid": instance.sop_instance_uid, "series_instance_uid": instance.series_instance_uid},
        ).first()

        rebuildable = False  # whether the series folder can rebuild this commit if a crash loses it
        if latest is not None:
            existing_sha256 = latest.sha256
            if existing_sha256 == sha256:
                self._skip_commit_flush(connection)  # a lost duplicate count harms nothing
                values: dict[str, Any] = {"num_duplicates": Series.num_duplicates + 1}
                if latest.state == SeriesState.RECEIVING:
                    values["last_received_at"] = now  # a resend in progress keeps the series open
                connection.execute(update(Series).where(Series.id == latest.id).values(**values))
                connection.execute(
                    insert(SeriesEvent).values(
                        series_id=latest.id, kind="duplicate", detail={"sop_instance_uid": instance.sop_instance_uid}
                    )
                )
                return StoreResult(StoreOutcome.DUPLICATE, latest.id, latest.version)
            if existing_sha256 is not None:
                return self._quarantine(
                    session,
                    series_id=latest.id,
                    series_version=latest.version,
                    tmp_path=writing.result(),
                    instance=instance,
                    sha256=sha256,
                    size_bytes=size_bytes,
                    transfer_syntax_uid=transfer_syntax_uid,
                    calling_ae_title=calling_ae_title,
                    now=now,
                )
            if latest.state != SeriesState.RECEIVING:
                series_id, version = self._open_new_version(
                    session, previous_id=latest.id, calling_ae_title=calling_ae_title, now=now
                )
            else:
                series_id, version = latest.id, latest.version
                # The file lands in this receiving version's folder, durably, before the commit:
                # a lost commit is rebuilt from there (index_unindexed_files).
                rebuildable = latest.study_instance_uid == instance.study_instance_uid
        else:
            # IntegrityError here if another association created the series first (the caller retries).
            series_id = connection.execute(
                insert(Series)
                .values(
                    series_instance_uid=instance.series_instance_uid,
                    version=1,
                    study_instance_uid=instance.study_instance_uid,
                    frame_of_reference_uid=instance.frame_of_reference_uid,
                    modality=instance.modality,
                    calling_ae_title=calling_ae_title,
                    state=INITIAL_STATE.value,
                    num_instances=0,
                    num_duplicates=0,
                    queue_attempts=0,
                    superseded=False,
                    first_received_at=now,
                    last_received_at=now,
                    patient_name=instance.patient_name,
                    patient_id=instance.patient_id,
                    study_date=_parse_date(instance.study_date),
                    series_description=instance.series_description,
                )
                .returning(Series.id)
            ).scalar_one()
            version = 1
            connection.execute(
                insert(SeriesEvent).values(
                    series_id=series_id, kind="received_first_instance", detail={"calling_ae_title": calling_ae_title}
                )
            )

        relative_path = "/".join(
            ("dicom", instance.study_instance_uid, instance.series_instance_uid, f"{instance.sop_instance_uid}.dcm")
        )
        folder_synced = self._place(writing.result(), relative_path)  # synced while the rows are written
        if rebuildable:
            self._skip_commit_flush(connection)
        row = {
            "new_series_id": series_id,
            "new_sop_instance_uid": instance.sop_instance_uid,
            "new_sop_class_uid": instance.sop_class_uid,
            "new_transfer_syntax_uid": transfer_syntax_uid,
            "new_relative_path": relative_path,
            "new_sha256": sha256,
            "new_size_bytes": size_bytes,
            "new_received_at": now,
        }
        if self._one_statement_index:
            connection.execute(_ADD_AND_COUNT_INSTANCE, row)
        else:
            connection.execute(_ADD_INSTANCE, row)
            connection.execute(_COUNT_INSTANCE, row)
        folder_synced.result()  # the rename is durable before the commit makes the row visible
        return StoreResult(StoreOutcome.STORED, series_id, version)

    def _skip_commit_flush(self, connection: Connection) -> None:
        """Let this transaction commit without waiting for the WAL flush (PostgreSQL only)."""
        if self._commit_without_flush:
            connection.execute(_COMMIT_WITHOUT_FLUSH)

    def series_folder(self, *, study_instance_uid: str, series_instance_uid: str) -> Path:
        """The folder that holds the files of every version of a series."""
        return self.storage_dir / "dicom" / study_instance_uid / series_instance_uid

    def index_unindexed_files(self, session: Session, series: Series) -> int:
        """Index the files in `series`' folder that none of its instance rows names; return how many.

        The recovery of commits lost in a crash of PostgreSQL or of the machine (module docstring).
        Every file in a series folder is complete (written and synced before it was renamed there),
        so one without a row was either acknowledged and its row lost, or renamed just before its
        transaction failed (never acknowledged; indexing it is what the sender's retry would do).
        `series` must be a receiving version, locked by the caller (`with_for_update`) in
        `session`'s transaction, so that no store of this series is between rename and commit.
        Its `last_received_at` moves to the newest recovered file's modification time if later.
        A file that is not a DICOM instance of this series, or cannot be read, is logged and left
        alone.

        Raises:
            OSError: the folder cannot be listed.
        """
        folder = self.series_folder(
            study_instance_uid=series.study_instance_uid, series_instance_uid=series.series_instance_uid
        )
        try:
            names = sorted(entry.name for entry in os.scandir(folder) if entry.name.endswith(".dcm"))
        except FileNotFoundError:
            return 0
        indexed = set(session.scalars(select(Instance.relative_path).where(Instance.series_id == series.id)))
        prefix = f"dicom/{series.study_instance_uid}/{series.series_instance_uid}/"
        rows = []
        for name in names:
            relative_path = prefix + name
            if relative_path in indexed:
                continue
            row = self._instance_row(folder / name, series=series, relative_path=relative_path)
            if row is not None:
                rows.append(row)
        if not rows:
            return 0
        session.execute(insert(Instance), rows)
        series.num_instances += len(rows)
        series.last_received_at = max(series.last_received_at, *(row["received_at"] for row in rows))
        session.add(SeriesEvent(series_id=series.id, kind="recovered_instances", detail={"count": len(rows)}))
        log.warning(
            "series id %s: indexed %s durable instance file(s) whose index row was missing (lost commit)",
            series.id,
            len(rows),
        )
        return len(rows)

    def recover_unindexed_files(self) -> int:
        """Start-up: `index_unindexed_files` for every receiving series version; return how many were indexed.

        Raises:
            OSError: a series folder cannot be listed.
            sqlalchemy.exc.SQLAlchemyError: the database did not answer or commit.
        """
        with self.sessions() as session:
            series_ids = session.scalars(
                select(Series.id).where(Series.state == INITIAL_STATE.value, Series.superseded.is_(False))
            ).all()
        recovered = 0
        for series_id in series_ids:
            with self.write_lock(), self.sessions.begin() as session:
                series = session.get(Series, series_id, with_for_update=True)
                if series is not None and series.state == INITIAL_STATE.value:
                    recovered += self.index_unindexed_files(session, series)
        if recovered:
            log.warning("start-up: indexed %s durable instance file(s) whose index row was missing", recovered)
        return recovered

    def _instance_row(self, path: Path, *, series: Series, relative_path: str) -> dict[str, Any] | None:
        """The `instance` row of a stored file of `series`, or None (logged) if it is not one or unreadable."""
        try:
            dataset = dcmread(path, stop_before_pixels=True)
            with path.open("rb") as file:
                sha256 = hashlib.file_digest(file, "sha256").hexdigest()
            status = path.stat()
            row = {
                "series_id": series.id,
                "sop_instance_uid": str(dataset.SOPInstanceUID),
                "sop_class_uid": str(dataset.file_meta.MediaStorageSOPClassUID),
                "transfer_syntax_uid": str(dataset.file_meta.TransferSyntaxUID),
                "relative_path": relative_path,
                "sha256": sha256,
                "size_bytes": status.st_size,
                "received_at": dt.datetime.fromtimestamp(status.st_mtime, dt.UTC),
            }
            belongs = (
                f"{row['sop_instance_uid']}.dcm" == path.name
                and str(dataset.SeriesInstanceUID) == series.series_instance_uid
                and str(dataset.StudyInstanceUID) == series.study_instance_uid
            )
        except Exception as exc:  # OSError, or one of pydicom's many on bad bytes: not indexable
            log.warning("series id %s: cannot read %s (%s); not indexed", series.id, path.name, type(exc).__name__)
            return None
        if not belongs:
            log.warning("series id %s: %s is not an instance of this series; not indexed", series.id, path.name)
            return None
        return row

    def _quarantine(
        self,
        session: Session,
        *,
        series_id: int,
        series_version: int,
        tmp_path: Path,
        instance: CheckedInstance,
        sha256: str,
        size_bytes: int,
        transfer_syntax_uid: str,
        calling_ae_title: str,
        now: dt.datetime,
    ) -> StoreResult:
        relative_path = f"quarantine/{instance.sop_instance_uid}.{sha256}.dcm"
        self._place(tmp_path, relative_path).result()
        session.add(
            QuarantinedInstance(
                series_id=series_id,
                sop_instance_uid=instance.sop_instance_uid,
                sop_class_uid=instance.sop_class_uid,
                transfer_syntax_uid=transfer_syntax_uid,
                relative_path=relative_path,
                sha256=sha256,
                size_bytes=size_bytes,
                calling_ae_title=calling_ae_title,
                received_at=now,
            )
        )
        session.add(
            SeriesEvent(
                series_id=series_id,
                kind="quarantined",
                detail={"sop_instance_uid": instance.sop_instance_uid, "relative_path": relative_path},
            )
        )
        log.warning(
            "instance %s of series %s (id %s) received again with different content; kept in %s",
            instance.sop_instance_uid,
            instance.series_instance_uid,
            series_id,
            relative_path,
        )
        return StoreResult(StoreOutcome.QUARANTINED, series_id, series_version)

    def _open_new_version(
        self, session: Session, *, previous_id: int, calling_ae_title: str, now: dt.datetime
    ) -> tuple[int, int]:
        """A new instance arrived after completion: start the next version with the earlier instances.

        The previous version keeps its rows and results and is marked superseded. Returns the
        new version's id and number.
        """
        previous = session.get(Series, previous_id)
        assert previous is not None  # locked by the caller
        series = Series(
            series_instance_uid=previous.series_instance_uid,
            version=previous.version + 1,
            study_instance_uid=previous.study_instance_uid,
            frame_of_reference_uid=previous.frame_of_reference_uid,
            modality=previous.modality,
            calling_ae_title=calling_ae_title,
            state=INITIAL_STATE.value,
            num_instances=previous.num_instances,
            num_duplicates=0,
            queue_attempts=0,
            first_received_at=now,
            last_received_at=now,
            patient_name=previous.patient_name,
            patient_id=previous.patient_id,
            study_date=previous.study_date,
            series_description=previous.series_description,
        )
        session.add(series)
        session.flush()  # IntegrityError here if another association opened this version first
        columns = (
            "sop_instance_uid",
            "sop_class_uid",
            "transfer_syntax_uid",
            "relative_path",
            "sha256",
            "size_bytes",
            "received_at",
        )
        session.execute(
            insert(Instance).from_select(
                ["series_id", *columns],
                select(literal(series.id), *(getattr(Instance, c) for c in columns)).where(
                    Instance.series_id == previous.id
                ),
            )
        )
        previous.superseded = True
        session.add(
            SeriesEvent(
                series_id=previous.id,
                kind="superseded",
                detail={"by_series_id": series.id, "by_version": series.version},
            )
        )
        session.add(
            SeriesEvent(
                series_id=series.id,
                kind="reopened",
                detail={
                    "previous_series_id": previous.id,
                    "previous_version": previous.version,
                    "calling_ae_title": calling_ae_title,
                },
            )
        )
        session.flush()
        log.info("series %s reopened as version %s (id %s)", previous.series_instance_uid, series.version, series.id)
        return series.id, series.version


def _parse_date(value: str | None) -> dt.date | None:
    """A DICOM DA value (YYYYMMDD) as a date; None when absent or not a valid date (display only)."""
    if not value:
        return None
    try:
        return dt.datetime.strptime(value.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None
