"""The listener's limits, one test each, against a real listener, PostgreSQL and senders: instance size,
inflated size of Deflated data sets, concurrent associations, ACSE / DIMSE / network timeouts; and the
orphaned temporary files of failed stores removed at start-up."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from ingest_support import (
    Db,
    ct_files,
    make_phantom,
    make_settings,
    running_listener,
    storescu,
    upgrade,
    wait_for,
)
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association

from service.ingest.checks import OUT_OF_RESOURCES, RefusedInstance, inflate
from service.ingest.orphans import remove_orphaned_temporary_files
from service.settings import Settings

pytestmark = pytest.mark.integration

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
BIG_SIDE = 4096  # a 4096 x 4096 16-bit slice: 32 MiB of Pixel Data
OUT_OF_RESOURCES_TEXT = "Refused: OutOfResources"  # how storescu -v prints 0xA700


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom(tmp_path_factory.mktemp("phantom"), slices=3, seed=21)[0]


@pytest.fixture(scope="module")
def big_files(tmp_path_factory: pytest.TempPathFactory, series: Path) -> dict[str, Path]:
    """A 32-MiB CT instance (zeros), as Explicit VR Little Endian and Deflated (about 32 KiB sent)."""
    out = tmp_path_factory.mktemp("big")
    files = {}
    for name, syntax in (("explicit", ExplicitVRLittleEndian), ("deflated", DeflatedExplicitVRLittleEndian)):
        dataset = dcmread(ct_files(series)[0])
        dataset.Rows = dataset.Columns = BIG_SIDE
        dataset.PixelData = bytes(BIG_SIDE * BIG_SIDE * 2)
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.file_meta.TransferSyntaxUID = syntax
        files[name] = out / f"{name}.dcm"
        dataset.save_as(files[name], enforce_file_format=True)
    return files


@pytest.fixture
def db_url(postgres_db_url: str) -> str:
    upgrade(postgres_db_url)
    return postgres_db_url


@pytest.fixture
def no_store_url(tmp_path: Path) -> str:
    """A database URL for a listener that stores nothing in the test (no server, no migration needed)."""
    return f"sqlite:///{tmp_path / 'unused.db'}"


@pytest.fixture
def db(db_url: str) -> Iterator[Db]:
    database = Db(db_url)
    yield database
    database.close()


def deflated_copy(source: Path, out: Path) -> Path:
    dataset = dcmread(source)
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dataset.save_as(out, enforce_file_format=True)
    return out


def associate(port: int, *syntaxes: str, contexts: tuple[str, ...] = (CT_IMAGE_STORAGE,)) -> Association:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for abstract in contexts:
        for syntax in syntaxes or (ExplicitVRLittleEndian,):
            ae.add_requested_context(abstract, syntax)
    return ae.associate("127.0.0.1", port, ae_title="GATEKEEPER")


def send_files(port: int, paths: list[Path], syntax: str) -> list[int]:
    """Send the files' data sets as they are (bytes from the file), one association; the statuses."""
    assoc = associate(port, syntax)
    assert assoc.is_established
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return [int(assoc.send_c_store(path).Status) for path in paths]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


def store_statuses(port: int, paths: list[Path], *options: str) -> tuple[list[str], int]:
    """Send with DCMTK storescu (its own process); the response statuses it printed, and the peak of
    Python memory allocated meanwhile in this process (where the listener runs, all its threads)."""
    tracemalloc.start()
    try:
        sent = storescu(port, paths, *options)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return re.findall(r"Received Store Response \(([^)]*)\)", sent.stdout + sent.stderr), peak


def test_instance_larger_than_max_instance_bytes_is_refused_without_being_kept(
    tmp_path: Path, db_url: str, redis_url: str, db: Db, series: Path, big_files: dict[str, Path]
) -> None:
    settings = make_settings(tmp_path / "var", db_url, redis_url, max_instance_bytes=1_000_000)
    with running_listener(settings, run_assembler=False) as listener:
        statuses, peak = store_statuses(listener.port, [big_files["explicit"]])
        assert statuses == [OUT_OF_RESOURCES_TEXT]
        # 32 MiB went through; the listener kept about the limit plus a PDU, never the data set.
        assert peak < 12_000_000, peak
        assert db.series() == []
        assert list((settings.storage_dir / "tmp").iterdir()) == []
        # A normal instance on the same listener is stored.
        assert send_files(listener.port, ct_files(series)[:1], ExplicitVRLittleEndian) == [0x0000]
    assert [s.num_instances for s in db.series()] == [1]


def test_deflated_data_set_inflating_past_max_inflated_bytes_is_refused_before_inflating_it(
    tmp_path: Path, db_url: str, redis_url: str, db: Db, series: Path, big_files: dict[str, Path]
) -> None:
    assert big_files["deflated"].stat().st_size < 200_000  # 32 MiB of zeros deflate to almost nothing
    settings = make_settings(tmp_path / "var", db_url, redis_url, max_inflated_bytes=4_000_000)
    small = deflated_copy(ct_files(series)[1], tmp_path / "small-deflated.dcm")
    with running_listener(settings, run_assembler=False) as listener:
        statuses, peak = store_statuses(listener.port, [big_files["deflated"]], "-xd")
        assert statuses == [OUT_OF_RESOURCES_TEXT]
        assert peak < 16_000_000, peak  # inflation stopped at the 4-MB limit, never near 32 MiB
        assert send_files(listener.port, [small], DeflatedExplicitVRLittleEndian) == [0x0000]
    [stored] = db.series()
    [instance] = db.instances(stored.id)
    assert instance.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    # Kept as received: still deflated.
    assert (settings.storage_dir / instance.relative_path).read_bytes().endswith(small.read_bytes()[-1000:])


def test_inflate_stops_at_the_limit_of_a_decompression_bomb() -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    bomb = b"".join(compressor.compress(chunk) for _ in range(64)) + compressor.flush()  # 64 MiB of zeros
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(RefusedInstance) as refused:
            inflate(bomb, max_inflated_bytes=1_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.status == OUT_OF_RESOURCES and "1000000" in refused.value.comment
    assert peak < 4_000_000, peak
    assert inflate(zlib.compress(b"abc" * 10)[2:-4], max_inflated_bytes=30) == b"abc" * 10  # raw deflate
    with pytest.raises(EOFError):
        inflate(bomb[:1000], max_inflated_bytes=1 << 30)  # cut off: never acknowledged


def test_max_associations_rejects_more_and_accepts_again_when_one_ends(
    tmp_path: Path, no_store_url: str, redis_url: str
) -> None:
    settings = make_settings(tmp_path / "var", no_store_url, redis_url, max_associations=2)
    with running_listener(settings, run_assembler=False) as listener:
        held = [associate(listener.port, contexts=(VERIFICATION,)) for _ in range(2)]
        assert all(a.is_established for a in held)
        third = associate(listener.port, contexts=(VERIFICATION,))
        assert third.is_rejected and not third.is_established
        held[0].release()
        again = wait_for(lambda: _established_or_none(listener.port), timeout=20)
        again.release()
        held[1].release()


def test_connections_closed_before_their_associate_request_do_not_hold_association_slots(
    tmp_path: Path, no_store_url: str, redis_url: str
) -> None:
    """TCP health checks and port scans connect and close; each must free its slot at once, not at the ACSE timeout."""
    settings = make_settings(tmp_path / "var", no_store_url, redis_url, max_associations=2, acse_timeout_s=60.0)
    with running_listener(settings, run_assembler=False) as listener:
        for partial in (b"", b"", b"\x01\x00\x00\x00", b"\x01\x00\x00\x00\x00\x50garbage", b""):
            with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as probe:
                probe.sendall(partial)
        started = time.monotonic()
        assoc = wait_for(lambda: _established_or_none(listener.port), timeout=30)
        assert time.monotonic() - started < 20  # long before the 60-s ACSE timeout
        assoc.release()


def _established_or_none(port: int) -> Association | None:
    assoc = associate(port, contexts=(VERIFICATION,))
    return assoc if assoc.is_established else None


def test_acse_dimse_and_network_timeouts_of_each_association_come_from_the_settings(
    tmp_path: Path, no_store_url: str, redis_url: str
) -> None:
    settings = make_settings(
        tmp_path / "var", no_store_url, redis_url, acse_timeout_s=11.0, dimse_timeout_s=12.0, network_timeout_s=13.0
    )
    with running_listener(settings, run_assembler=False) as listener:
        assoc = associate(listener.port, contexts=(VERIFICATION,))
        assert assoc.is_established
        [served] = wait_for(lambda: listener.servers[0].active_associations, timeout=10)
        assert (served.acse_timeout, served.dimse_timeout, served.network_timeout) == (11.0, 12.0, 13.0)
        assoc.release()


def test_acse_timeout_closes_a_connection_that_never_asks_for_an_association(
    tmp_path: Path, no_store_url: str, redis_url: str
) -> None:
    settings = make_settings(tmp_path / "var", no_store_url, redis_url, acse_timeout_s=1.0, network_timeout_s=60.0)
    with running_listener(settings, run_assembler=False) as listener:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", listener.port), timeout=30) as silent:
            assert silent.recv(64) == b""  # closed by the listener, long before the 60-s network timeout
        assert time.monotonic() - started < 20


def test_network_timeout_ends_connections_stalled_or_trickling_inside_a_pdu(
    tmp_path: Path, no_store_url: str, redis_url: str
) -> None:
    settings = make_settings(tmp_path / "var", no_store_url, redis_url, acse_timeout_s=60.0, network_timeout_s=1.5)
    with running_listener(settings, run_assembler=False) as listener:
        stalled = associate(listener.port)
        trickling = associate(listener.port)
        assert stalled.is_established and trickling.is_established
        # A P-DATA-TF PDU header that announces 10 000 bytes, then (almost) nothing.
        header = b"\x04\x00" + (10_000).to_bytes(4, "big")
        stalled.dul.socket.socket.sendall(header + b"\x00" * 10)  # type: ignore[union-attr]
        trickle_socket = trickling.dul.socket.socket  # type: ignore[union-attr]
        trickle_socket.sendall(header)
        # Half an A-ASSOCIATE-RQ (it announces 200 bytes), then silence: before any association.
        half_request = socket.create_connection(("127.0.0.1", listener.port), timeout=30)
        half_request.sendall(b"\x01\x00" + (200).to_bytes(4, "big") + b"\x00\x01\x00\x00GATEKEEPER")
        started = time.monotonic()
        while not (stalled.is_aborted and trickling.is_aborted) and time.monotonic() - started < 30:
            with contextlib.suppress(OSError):  # one byte every 0.3 s: never idle for the network timeout
                trickle_socket.send(b"\x00")
            time.sleep(0.3)
        assert stalled.is_aborted, "a sender silent inside a PDU was not aborted"
        assert trickling.is_aborted, "a sender trickling a PDU was not aborted"
        with half_request:
            assert half_request.recv(64) == b""  # closed by the listener (the 60-s ACSE timeout is far)
        assert time.monotonic() - started < 20


def test_orphaned_temporary_files_are_removed_at_start_up_and_unindexed_placed_files_kept(
    tmp_path: Path, db_url: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path / "var", db_url, redis_url, orphan_tmp_age_s=30.0)
    tmp_dir = settings.storage_dir / "tmp"
    tmp_dir.mkdir(parents=True)
    old = [tmp_dir / f"crashed{i}.part" for i in range(3)]
    for path in old:
        path.write_bytes(b"half an instance")
        os.utime(path, (time.time() - 600, time.time() - 600))
    live = tmp_dir / "being-written.part"
    live.write_bytes(b"another process is writing this")
    placed = settings.storage_dir / "dicom" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"renamed into place, index never committed")
    with caplog.at_level(logging.INFO, logger="service.ingest.orphans"), running_listener(settings):
        pass
    assert not any(p.exists() for p in old)
    assert live.exists() and placed.exists()
    assert "removed 3 orphaned temporary file(s)" in caplog.text


def test_orphan_sweep_spares_young_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "old.part").write_bytes(b"x")
    (tmp_path / "young.part").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    os.utime(tmp_path / "old.part", (1000.0, 1000.0))
    os.utime(tmp_path / "folder", (1000.0, 1000.0))
    assert remove_orphaned_temporary_files(tmp_path, older_than_s=60) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "young.part"]
    assert remove_orphaned_temporary_files(tmp_path / "missing", older_than_s=60) == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_instance_bytes", 0),
        ("max_inflated_bytes", 100),
        ("orphan_tmp_age_s", 0),
        ("max_associations", 0),
        ("acse_timeout_s", 0),
        ("dimse_timeout_s", -1),
        ("network_timeout_s", 0),
    ],
)
def test_limit_settings_refuse_impossible_values(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})  # type: ignore[arg-type]
