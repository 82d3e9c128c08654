"""The listener with real senders (DCMTK storescu/echoscu, pynetdicom as a raw-bytes SCU), real PostgreSQL
and Redis: statuses, database rows, files on disk, access control, bad input, faults."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from ingest_support import (
    Db,
    ct_files,
    echoscu,
    free_port,
    make_phantom,
    make_settings,
    running_listener,
    storescu,
    upgrade,
    wait_for,
)
from pydicom import dcmread
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.engine import make_url

from service.celery_app import MATCH_CONTOURS_TASK
from service.commands import ingest as ingest_cli
from service.db.tables import QuarantinedInstance
from service.lifecycle import SeriesState
from service.settings import get_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small series (6 slices, 128×128) shared read-only by the tests of this module."""
    return make_phantom(tmp_path_factory.mktemp("phantom"), slices=6, seed=11, series=3)[0].parent


@pytest.fixture
def series_a(phantom_dir: Path) -> Path:
    return sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0]


@pytest.fixture
def db_url(postgres_db_url: str) -> str:
    upgrade(postgres_db_url)
    return postgres_db_url


@pytest.fixture
def db(db_url: str) -> Iterator[Db]:
    database = Db(db_url)
    yield database
    database.close()


@pytest.fixture
def settings(tmp_path: Path, db_url: str, redis_url: str):  # type: ignore[no-untyped-def]
    return make_settings(tmp_path / "var", db_url, redis_url)


def queue_length(redis_url: str, queue: str) -> int:
    return int(redis.Redis.from_url(redis_url).llen(queue))


def stored_series(db: Db, folder: Path):  # type: ignore[no-untyped-def]
    uid = dcmread(ct_files(folder)[0], stop_before_pixels=True).SeriesInstanceUID
    return db.series(uid)


def test_echo_is_answered(settings) -> None:  # type: ignore[no-untyped-def]
    with running_listener(settings, run_assembler=False) as listener:
        result = echoscu(listener.port)
    assert result.returncode == 0, result.stderr


def test_series_is_stored_indexed_completed_and_queued_with_ids_only(
    settings, db: Db, series_a: Path, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    files = ct_files(series_a)
    with running_listener(settings) as listener:
        result = storescu(listener.port, files)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count("Received Store Response (Success)") + result.stderr.count(
            "Received Store Response (Success)"
        ) == len(files)
        [series] = wait_for(lambda: [s for s in stored_series(db, series_a) if s.state == SeriesState.QUEUED])
    assert series.num_instances == len(files) and series.version == 1
    assert series.geometry_findings == []
    instances = db.instances(series.id)
    assert sorted(i.sop_instance_uid for i in instances) == sorted(
        dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files
    )
    for instance in instances:
        stored = settings.storage_dir / instance.relative_path
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == instance.sha256
        assert instance.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert list((settings.storage_dir / "tmp").iterdir()) == []
    assert db.event_kinds(series.id) == ["received_first_instance", "completed", "geometry_checked", "queued"]

    # Exactly one message, whose arguments are the internal id and nothing about the patient.
    client = redis.Redis.from_url(redis_url)
    messages = client.lrange(settings.pipeline_queue, 0, -1)
    assert len(messages) == 1
    message = json.loads(messages[0])
    assert message["headers"]["task"] == "gatekeeper.pipeline.process_series"
    assert message["headers"]["argsrepr"] == f"[{series.id}]"
    patient = dcmread(files[0], stop_before_pixels=True)
    for secret in (str(patient.PatientName), str(patient.PatientID)):
        assert secret and secret not in messages[0].decode()


def test_unknown_calling_ae_is_rejected_and_listener_keeps_serving(settings, series_a: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    with running_listener(settings, run_assembler=False) as listener:
        with caplog.at_level(logging.WARNING, logger="service.ingest.listener"):
            result = storescu(listener.port, ct_files(series_a)[:1], aet="INTRUDER")
        assert result.returncode != 0
        assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
        assert "calling AE title 'INTRUDER' is not allowed" in caplog.text
        assert echoscu(listener.port).returncode == 0


def test_unknown_address_is_rejected(tmp_path: Path, db_url: str, redis_url: str, series_a: Path, db: Db) -> None:
    settings = make_settings(tmp_path / "var", db_url, redis_url, allowed_networks=["10.0.0.0/8", "::1/128"])
    with running_listener(settings, run_assembler=False) as listener:
        result = storescu(listener.port, ct_files(series_a)[:1])
        assert "Association Rejected" in result.stdout + result.stderr
    assert db.series() == []


def test_mr_and_us_images_are_refused_at_negotiation(settings, db: Db) -> None:  # type: ignore[no-untyped-def]
    data = third_party_dir()
    with running_listener(settings, run_assembler=False) as listener:
        for name in ("MR2_UNCI.dcm", "US1_UNCI.dcm"):
            result = storescu(listener.port, [data / name])
            assert result.returncode != 0
            assert "No presentation context" in result.stdout + result.stderr
        assert echoscu(listener.port).returncode == 0
    assert db.series() == []


def third_party_dir() -> Path:
    import data_store

    return Path(data_store.__file__).parent / "data"


# --- bad bytes, sent as they are by pynetdicom (storescu refuses to read broken files) -------------


def send_raw(port: int, path: Path) -> int:
    """Send the data set of `path` without decoding it (bytes as in the file); return the C-STORE status."""
    from pynetdicom import _config

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEKEEPER")
    assert assoc.is_established
    sends_raw_bytes = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = sends_raw_bytes
        assoc.release()


def corrupt_copies(source: Path, out: Path) -> dict[str, Path]:
    """Broken variants of a valid CT file, each named after its defect."""
    out.mkdir()
    raw = source.read_bytes()
    dataset = dcmread(source)
    variants: dict[str, Path] = {}

    truncated = out / "truncated.dcm"
    truncated.write_bytes(raw[: len(raw) // 2])
    variants["truncated"] = truncated

    # Garbage over a data element header in the middle of the data set (before Pixel Data).
    garbage = bytearray(raw)
    offset = raw.index(b"\x28\x00\x10\x00")  # (0028,0010) Rows
    garbage[offset : offset + 8] = b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8"
    variants["garbage_in_element"] = out / "garbage.dcm"
    variants["garbage_in_element"].write_bytes(bytes(garbage))

    # A value length that runs past the end of the data set: (0010,0010) Patient Name says 60000 bytes.
    wrong_length = bytearray(raw)
    offset = raw.index(b"\x10\x00\x10\x00PN")
    wrong_length[offset + 6 : offset + 8] = (60000).to_bytes(2, "little")
    variants["wrong_value_length"] = out / "wrong_length.dcm"
    variants["wrong_value_length"].write_bytes(bytes(wrong_length))

    no_pixels = dcmread(source)
    del no_pixels.PixelData
    variants["missing_pixel_data"] = out / "no_pixels.dcm"
    no_pixels.save_as(variants["missing_pixel_data"])

    short_pixels = dcmread(source)
    short_pixels.PixelData = dataset.PixelData[: len(dataset.PixelData) // 2]
    variants["pixel_data_size_mismatch"] = out / "short_pixels.dcm"
    short_pixels.save_as(variants["pixel_data_size_mismatch"])
    return variants


@pytest.mark.parametrize(
    ("defect", "status"),
    [
        ("truncated", 0xC210),
        ("garbage_in_element", 0xC210),
        ("wrong_value_length", 0xC210),
        ("missing_pixel_data", 0xA900),
        ("pixel_data_size_mismatch", 0xA900),
    ],
)
def test_corrupt_data_set_is_refused_and_not_stored(
    settings, db: Db, series_a: Path, tmp_path: Path, defect: str, status: int
) -> None:  # type: ignore[no-untyped-def]
    broken = corrupt_copies(ct_files(series_a)[0], tmp_path / "broken")[defect]
    with running_listener(settings, run_assembler=False) as listener:
        assert send_raw(listener.port, broken) == status
        assert db.series() == []
        # still serving: a good instance goes through
        assert send_raw(listener.port, ct_files(series_a)[1]) == 0x0000
    assert [s.num_instances for s in db.series()] == [1]


def test_identical_duplicate_is_acknowledged_and_not_stored_twice(settings, db: Db, series_a: Path) -> None:  # type: ignore[no-untyped-def]
    first = ct_files(series_a)[0]
    with running_listener(settings, run_assembler=False) as listener:
        assert storescu(listener.port, [first]).returncode == 0
        assert storescu(listener.port, [first]).returncode == 0
    [series] = db.series()
    assert series.num_instances == 1 and series.num_duplicates == 1
    assert len(list((settings.storage_dir / "dicom").rglob("*.dcm"))) == 1
    assert "duplicate" in db.event_kinds(series.id)


def test_different_content_under_same_uid_is_quarantined_not_overwritten(
    settings, db: Db, series_a: Path, tmp_path: Path, caplog
) -> None:  # type: ignore[no-untyped-def]
    first = ct_files(series_a)[0]
    changed = dcmread(first)
    changed.SeriesDescription = "edited after sending"
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path)
    with running_listener(settings, run_assembler=False) as listener:
        assert storescu(listener.port, [first]).returncode == 0
        with caplog.at_level(logging.WARNING, logger="service.ingest.storage"):
            assert storescu(listener.port, [changed_path]).returncode == 0
    [series] = db.series()
    [instance] = db.instances(series.id)
    assert (settings.storage_dir / instance.relative_path).read_bytes()[128:] == first.read_bytes()[
        128:
    ] or hashlib.sha256((settings.storage_dir / instance.relative_path).read_bytes()).hexdigest() == instance.sha256
    assert dcmread(settings.storage_dir / instance.relative_path).get("SeriesDescription") != "edited after sending"
    with db.session() as session:
        [quarantined] = session.scalars(select(QuarantinedInstance)).all()
    assert quarantined.sop_instance_uid == instance.sop_instance_uid and quarantined.sha256 != instance.sha256
    assert dcmread(settings.storage_dir / quarantined.relative_path).SeriesDescription == "edited after sending"
    assert "quarantined" in db.event_kinds(series.id)
    assert "received again with different content" in caplog.text


def test_store_is_refused_with_out_of_resources_when_disk_reserve_is_reached(
    tmp_path: Path, db_url: str, redis_url: str, db: Db, series_a: Path
) -> None:
    settings = make_settings(tmp_path / "var", db_url, redis_url, min_free_disk_bytes=10**18)
    with running_listener(settings, run_assembler=False) as listener:
        result = storescu(listener.port, ct_files(series_a)[:1])
    assert "refused: outofresources" in (result.stdout + result.stderr).lower()
    assert db.series() == []
    assert list((settings.storage_dir / "dicom").rglob("*.dcm")) == []


def set_database_allows_connections(admin_url: str, database_url: str, allowed: bool) -> None:
    name = make_url(database_url).database
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


def test_stores_fail_while_database_is_unavailable_and_succeed_when_it_returns(
    settings, db_url: str, postgres_url: str, series_a: Path, db: Db
) -> None:  # type: ignore[no-untyped-def]
    files = ct_files(series_a)
    with running_listener(settings, run_assembler=False) as listener:
        assert storescu(listener.port, files[:1]).returncode == 0
        db.close()
        set_database_allows_connections(postgres_url, db_url, False)
        try:
            result = storescu(listener.port, files[1:3])
            output = (result.stdout + result.stderr).lower()
            assert "refused: outofresources" in output and "received store response (success)" not in output
        finally:
            set_database_allows_connections(postgres_url, db_url, True)
        result = storescu(listener.port, files[1:3])
        assert result.returncode == 0 and "outofresources" not in (result.stdout + result.stderr).lower()
    [series] = Db(db_url).series()
    assert series.num_instances == 3


def force_complete_cli(settings, uid: str, monkeypatch: pytest.MonkeyPatch, capsys) -> dict:  # type: ignore[no-untyped-def]
    for name in ("storage_dir", "database_url", "broker_url", "pipeline_queue"):
        monkeypatch.setenv(f"GATEKEEPER_{name.upper()}", str(getattr(settings, name)))
    get_settings.cache_clear()
    try:
        capsys.readouterr()
        code = ingest_cli.run_series(argparse.Namespace(action="complete", series_instance_uid=uid, json=True))
        output = json.loads(capsys.readouterr().out)
    finally:
        get_settings.cache_clear()
    assert code == (0 if output["completed_series_id"] else 1)
    return output


def test_forced_completion_then_late_instance_opens_a_new_version(
    tmp_path: Path, db_url: str, redis_url: str, db: Db, series_a: Path, monkeypatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path / "var", db_url, redis_url, quiet_period_s=3600)
    files = ct_files(series_a)
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    with running_listener(settings) as listener:
        assert storescu(listener.port, files[:4]).returncode == 0
        result = force_complete_cli(settings, uid, monkeypatch, capsys)
        assert result["queued"] is True
        [first] = db.series(uid)
        assert first.state == SeriesState.QUEUED and first.num_instances == 4
        assert force_complete_cli(settings, uid, monkeypatch, capsys)["completed_series_id"] is None

        assert storescu(listener.port, files[4:]).returncode == 0  # late instances
        assert storescu(listener.port, files[:1]).returncode == 0  # and an identical resend
        old, new = db.series(uid)
        assert old.superseded and old.state == SeriesState.QUEUED
        assert (new.version, new.state, new.num_instances, new.superseded) == (2, SeriesState.RECEIVING, 6, False)
        assert force_complete_cli(settings, uid, monkeypatch, capsys)["completed_series_id"] == new.id
    assert len(db.instances(new.id)) == 6 and len(db.instances(old.id)) == 4
    assert "superseded" in db.event_kinds(old.id) and "reopened" in db.event_kinds(new.id)
    assert queue_length(redis_url, settings.pipeline_queue) == 2


def test_quiet_period_is_configurable_per_calling_ae(
    tmp_path: Path, db_url: str, redis_url: str, db: Db, phantom_dir: Path
) -> None:
    slow, fast = sorted(p for p in phantom_dir.iterdir() if p.is_dir())[1:3]
    settings = make_settings(
        tmp_path / "var", db_url, redis_url, quiet_period_s=3600, quiet_period_s_by_ae={"TESTSCU": 0.5}
    )
    with running_listener(settings) as listener:
        assert storescu(listener.port, ct_files(slow)).returncode == 0
        assert storescu(listener.port, ct_files(fast), aet="TESTSCU").returncode == 0
        wait_for(lambda: stored_series(db, fast)[0].state == SeriesState.QUEUED)
        assert stored_series(db, slow)[0].state == SeriesState.RECEIVING


def test_restart_resumes_quiet_period_of_receiving_series(
    tmp_path: Path, db_url: str, redis_url: str, db: Db, series_a: Path
) -> None:
    import time

    settings = make_settings(tmp_path / "var", db_url, redis_url, quiet_period_s=3.0)
    files = ct_files(series_a)
    with running_listener(settings) as listener:
        assert storescu(listener.port, files[:3]).returncode == 0
    time.sleep(3.5)  # down for longer than the quiet period
    with running_listener(settings) as listener:
        time.sleep(1.0)
        [series] = stored_series(db, series_a)
        assert series.state == SeriesState.RECEIVING  # the sender gets a full quiet period to retry
        assert storescu(listener.port, files).returncode == 0
        [series] = wait_for(lambda: [s for s in stored_series(db, series_a) if s.state == SeriesState.QUEUED])
    assert series.num_instances == len(files) and series.version == 1 and series.num_duplicates == 3


def test_geometry_findings_are_recorded_for_a_series_with_a_missing_slice(settings, db: Db, series_a: Path) -> None:  # type: ignore[no-untyped-def]
    files = ct_files(series_a)
    with running_listener(settings) as listener:
        assert storescu(listener.port, files[:2] + files[3:]).returncode == 0
        [series] = wait_for(lambda: [s for s in stored_series(db, series_a) if s.state == SeriesState.QUEUED])
    assert [f["code"] for f in series.geometry_findings] == ["missing_slices"]
    assert "geometry_checked" in db.event_kinds(series.id)


def test_seg_and_rt_structure_set_are_stored_and_indexed_not_queued(
    settings, db: Db, series_a: Path, tmp_path: Path, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    seg = next((series_a / "ground_truth").glob("*.seg.dcm"))
    rtstruct = tmp_path / "rtstruct.dcm"
    make_rt_structure_set(ct_files(series_a)[0], rtstruct)
    with running_listener(settings) as listener:
        for path in (seg, rtstruct):
            result = storescu(listener.port, [path], "-R")
            assert result.returncode == 0, result.stdout + result.stderr
        uids = [str(dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in (seg, rtstruct)]
        for uid in uids:
            wait_for(lambda uid=uid: db.series(uid) and db.series(uid)[0].state == SeriesState.STORED)
        # Not queued for scoring: only the returned-contour stage (service/contours/), once per series.
        tasks = wait_for(lambda: t if len(t := queued_tasks(redis_url, settings.pipeline_queue)) >= 2 else None, 30)
    assert {db.series(uid)[0].modality for uid in uids} == {"SEG", "RTSTRUCT"}
    assert tasks == [MATCH_CONTOURS_TASK, MATCH_CONTOURS_TASK]


def queued_tasks(redis_url: str, queue: str) -> list[str]:
    """The task names of the messages waiting on a Redis queue (kombu's JSON envelope, Celery protocol 2)."""
    return [json.loads(m)["headers"]["task"] for m in redis.Redis.from_url(redis_url).lrange(queue, 0, -1)]


def make_rt_structure_set(ct_path: Path, out: Path) -> None:
    """A minimal RT Structure Set referencing one CT slice."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ct = dcmread(ct_path, stop_before_pixels=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.StudyInstanceUID = ct.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = ct.PatientName, ct.PatientID
    ds.StructureSetLabel = "manual"
    roi = Dataset()
    roi.ROINumber = 1
    roi.ROIName = "liver"
    roi.ReferencedFrameOfReferenceUID = ct.FrameOfReferenceUID
    ds.StructureSetROISequence = [roi]
    ds.save_as(out, enforce_file_format=True)


def test_series_stays_complete_while_broker_is_down_and_is_queued_when_it_returns(
    tmp_path: Path, db_url: str, redis_url: str, db: Db, series_a: Path
) -> None:
    from service.celery_app import CeleryPublisher, make_celery_app
    from service.ingest.queue import queue_due_series

    # A broker URL where nothing listens: publishing fails for real.
    down = make_settings(tmp_path / "var", db_url, f"redis://127.0.0.1:{free_port()}/0")
    with running_listener(down) as listener:
        assert storescu(listener.port, ct_files(series_a)).returncode == 0
        [series] = wait_for(lambda: [s for s in stored_series(db, series_a) if s.completed_at is not None])
    # The listener stopped after its assembler's last round, whose publication failed and gave the claim back.
    [series] = stored_series(db, series_a)
    assert (series.state, series.queue_attempts) == (SeriesState.COMPLETE, 0)
    assert "queued" not in db.event_kinds(series.id)
    up = make_settings(tmp_path / "var", db_url, redis_url)
    publisher = CeleryPublisher(make_celery_app(up), up)
    assert queue_due_series(sessions=Db(db_url).sessions, publisher=publisher, resend_after_s=300) == [series.id]
    [series] = stored_series(db, series_a)
    assert (series.state, series.queue_attempts) == (SeriesState.QUEUED, 1)
    assert queue_length(redis_url, up.pipeline_queue) == 1


def test_association_limit_timeouts_and_pdu_size_come_from_settings(
    tmp_path: Path, db_url: str, redis_url: str, series_a: Path
) -> None:
    import time

    settings = make_settings(
        tmp_path / "var", db_url, redis_url, max_associations=1, network_timeout_s=1.0, max_pdu_bytes=16384
    )
    with running_listener(settings, run_assembler=False) as listener:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        held = ae.associate("127.0.0.1", listener.port, ae_title="GATEKEEPER")
        assert held.is_established
        busy = storescu(listener.port, ct_files(series_a)[:1])
        assert "Local Limit Exceeded" in busy.stdout + busy.stderr
        time.sleep(2.5)  # idle longer than the network timeout: the listener aborts the association
        assert held.is_aborted and not held.is_established
        result = storescu(listener.port, ct_files(series_a)[:1])
        assert result.returncode == 0
        assert "Max Send PDV: 16372" in result.stdout + result.stderr  # 16384 minus the PDV header


def test_no_patient_data_in_logs_even_at_debug_level(settings, db: Db, series_a: Path, caplog, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = ct_files(series_a)
    header = dcmread(files[0], stop_before_pixels=True)
    secrets = [
        str(header.PatientName),
        str(header.PatientID),
        str(header.PatientBirthDate),
        str(header.AccessionNumber),
    ]
    assert all(secrets)
    changed = dcmread(files[0])
    changed.ImageComments = "changed"
    changed.save_as(tmp_path / "changed.dcm")
    with caplog.at_level(logging.DEBUG), running_listener(settings) as listener:
        assert storescu(listener.port, files).returncode == 0
        assert storescu(listener.port, files[:1] + [tmp_path / "changed.dcm"]).returncode == 0  # duplicate, quarantine
        assert storescu(listener.port, files[:1], aet="INTRUDER").returncode != 0
        wait_for(lambda: [s for s in stored_series(db, series_a) if s.state == SeriesState.QUEUED])
    assert "queued series id" in caplog.text and "rejecting association" in caplog.text
    import re

    for secret in secrets:  # digits-only values must not be found inside longer numbers (UIDs) by chance
        assert not re.search(rf"(?<![0-9.]){re.escape(secret)}(?![0-9])", caplog.text), secret
