"""Export of the SEG to the PACS: status classification, backoff bookkeeping, and Orthanc as the real PACS.

Unit tests use SQLite and a stand-in for the network; the integration tests send to a throwaway
Orthanc (its REST API tells what arrived), with PostgreSQL, Redis and a real `gatekeeper worker`.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
import redis
from ingest_support import (
    Db,
    free_port,
    gatekeeper_executable,
    make_settings,
    settings_env,
    upgrade,
    wait_for,
)
from sqlalchemy import select, update

from service.commands.main import main
from service.db.tables import Export, ExportAttempt, ExportState, utc_now
from service.dicom_seg import build_liver_seg
from service.dicom_send import (
    ExportNotConfiguredError,
    Outcome,
    SendResult,
    classify_association_rejection,
    classify_store_status,
    send_seg,
)
from service.pacs_export import (
    deliver,
    due_exports,
    export_receipt,
    record_export,
    retry_delay_s,
    retry_export,
)
from service.phantom.canvas import Label
from service.phantom.generate import SeriesSpec, generate_series
from service.settings import Settings, get_settings, load_settings_or_exit

# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seg_case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 12-slice 64² phantom CT series and the liver SEG made from its ground truth."""
    out = tmp_path_factory.mktemp("case")
    entry = generate_series(SeriesSpec(folder="ct", patient_seed=3, series_seed=103, num_slices=12, matrix=64), out)
    ct_paths = [out / "ct" / name for name in entry["files"]]
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in ct_paths]
    labels = hd.seg.segread(out / "ct" / entry["organs_seg"]).get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in headers],
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    seg = build_liver_seg(
        source_images=headers,
        mask=labels == Label.LIVER,
        algorithm_name="test liver model",
        algorithm_version="test-1",
        source_series_version=1,
    )
    seg_path = out / "liver.seg.dcm"
    seg.save_as(seg_path)
    return {
        "seg_path": seg_path,
        "sop_instance_uid": str(seg.SOPInstanceUID),
        "source_series_instance_uid": str(headers[0].SeriesInstanceUID),
        "study_instance_uid": str(headers[0].StudyInstanceUID),
        "ct_paths": ct_paths,
        "patient_name": str(headers[0].PatientName),
    }


@pytest.fixture
def sqlite_sessions(tmp_path: Path) -> Iterator[Any]:
    url = f"sqlite:///{tmp_path / 'gatekeeper.db'}"
    upgrade(url)
    db = Db(url)
    yield db.sessions
    db.close()


def unit_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "storage_dir": tmp_path / "var",
        "pacs_host": "127.0.0.1",
        "pacs_port": free_port(),
        "pacs_ae_title": "PACS",
        "export_retry_initial_s": 30,
        "export_retry_max_s": 3600,
        "export_retry_deadline_s": 48 * 3600,
        "export_timeout_s": 5,
    }
    values.update(overrides)
    return Settings(**values)


def fake_send(outcome: Outcome, status: int | None = None, reason: str | None = None) -> Any:
    calls: list[Path] = []

    def send(*, path: Path, settings: Settings) -> SendResult:
        calls.append(path)
        return SendResult(
            outcome=outcome,
            status=status,
            reason=reason,
            destination="PACS@127.0.0.1:104",
            started_at=utc_now(),
            duration_s=0.01,
        )

    send.calls = calls  # type: ignore[attr-defined]
    return send


def make_due(sessions: Any, export_id: int) -> None:
    """Pretend the backoff has passed."""
    with sessions.begin() as session:
        session.execute(update(Export).where(Export.id == export_id).values(next_attempt_at=utc_now()))


# --- classification ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0000, Outcome.DELIVERED),
        (0xB000, Outcome.DELIVERED),  # coercion of data elements: stored
        (0xB006, Outcome.DELIVERED),
        (0xB007, Outcome.DELIVERED),
        (0xA700, Outcome.TRANSIENT),  # out of resources
        (0xA7FF, Outcome.TRANSIENT),
        (0x0110, Outcome.TRANSIENT),  # processing failure
        (0x0213, Outcome.TRANSIENT),  # resource limitation
        (0xA900, Outcome.PERMANENT),  # data set does not match SOP class
        (0xA9FF, Outcome.PERMANENT),
        (0xC000, Outcome.PERMANENT),  # cannot understand
        (0xCFFF, Outcome.PERMANENT),
        (0x0122, Outcome.PERMANENT),  # SOP class not supported
        (0x0124, Outcome.PERMANENT),  # not authorized
        (0xA800, Outcome.PERMANENT),  # unknown failure: a person looks, no endless retry
    ],
)
def test_store_status_classification(status: int, outcome: Outcome) -> None:
    got, reason = classify_store_status(status)
    assert got == outcome
    assert reason.startswith(f"0x{status:04X} ")


def test_warning_reason_names_the_warning() -> None:
    assert classify_store_status(0xB000) == (Outcome.DELIVERED, "0xB000 warning: coercion of data elements")


def test_association_rejection_classification() -> None:
    outcome, reason = classify_association_rejection(result=1, source=1, reason=3)
    assert outcome == Outcome.PERMANENT
    assert reason == "association rejected permanently by the service-user: calling AE title not recognized"
    outcome, reason = classify_association_rejection(result=2, source=3, reason=2)
    assert outcome == Outcome.TRANSIENT and "local limit exceeded" in reason


def test_backoff_doubles_from_initial_up_to_max(tmp_path: Path) -> None:
    settings = unit_settings(tmp_path, export_retry_initial_s=30, export_retry_max_s=3600)
    delays = [retry_delay_s(round_attempts=n, settings=settings) for n in range(1, 10)]
    assert delays == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]


# --- settings ---------------------------------------------------------------------------------------


def test_pacs_destination_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEKEEPER_PACS_AE_TITLE", "MAIN_PACS")
    monkeypatch.setenv("GATEKEEPER_PACS_HOST", "pacs.example.org")
    monkeypatch.setenv("GATEKEEPER_PACS_PORT", "11112")
    get_settings.cache_clear()
    try:
        settings = load_settings_or_exit()
    finally:
        get_settings.cache_clear()
    assert (settings.pacs_ae_title, settings.pacs_host, settings.pacs_port) == ("MAIN_PACS", "pacs.example.org", 11112)
    assert settings.export_calling_ae_title() == settings.ae_title


def test_invalid_pacs_ae_title_exits_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEKEEPER_PACS_AE_TITLE", "A_TITLE_LONGER_THAN_16")
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit):
            load_settings_or_exit()
    finally:
        get_settings.cache_clear()
    assert capsys.readouterr().err.startswith("gatekeeper: invalid setting GATEKEEPER_PACS_AE_TITLE: ")


def test_pacs_tls_certificate_without_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pacs_tls_cert_path and pacs_tls_key_path must be set together"):
        unit_settings(tmp_path, pacs_tls=True, pacs_tls_cert_path=tmp_path / "cert.pem")


def test_retry_max_below_initial_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="export_retry_max_s 10.0 is less than export_retry_initial_s 30.0"):
        unit_settings(tmp_path, export_retry_initial_s=30, export_retry_max_s=10)


def test_export_without_pacs_host_is_refused(tmp_path: Path, seg_case: dict[str, Any], sqlite_sessions: Any) -> None:
    with pytest.raises(ExportNotConfiguredError, match="GATEKEEPER_PACS_HOST"):
        record_export(
            sessions=sqlite_sessions, settings=unit_settings(tmp_path, pacs_host=""), path=seg_case["seg_path"]
        )


# --- deliver(): state, attempts, backoff (SQLite, no network) -----------------------------------------


def test_transient_failure_stays_pending_and_backs_off(
    tmp_path: Path, seg_case: dict[str, Any], sqlite_sessions: Any
) -> None:
    settings = unit_settings(tmp_path)
    export_id, created = record_export(sessions=sqlite_sessions, settings=settings, path=seg_case["seg_path"])
    assert created
    send = fake_send(Outcome.TRANSIENT, 0xA700, "0xA700 refused: out of resources")
    first = deliver(sessions=sqlite_sessions, settings=settings, export_id=export_id, send=send)
    assert first.attempted and first.state == ExportState.PENDING and first.retry_after_s == 30
    # A duplicate message before the due time sends nothing.
    duplicate = deliver(sessions=sqlite_sessions, settings=settings, export_id=export_id, send=send)
    assert not duplicate.attempted and len(send.calls) == 1
    make_due(sqlite_sessions, export_id)
    second = deliver(sessions=sqlite_sessions, settings=settings, export_id=export_id, send=send)
    assert second.retry_after_s == 60
    receipt = export_receipt(sessions=sqlite_sessions, export_id=export_id)
    assert receipt["attempts"] == 2 and receipt["last_status"] == "0xA700"
    assert [a["outcome"] for a in receipt["attempt_log"]] == ["transient", "transient"]


def test_permanent_failure_fails_at_once(tmp_path: Path, seg_case: dict[str, Any], sqlite_sessions: Any) -> None:
    settings = unit_settings(tmp_path)
    export_id, _ = record_export(sessions=sqlite_sessions, settings=settings, path=seg_case["seg_path"])
    send = fake_send(Outcome.PERMANENT, 0x0122, "0x0122 refused: SOP class not supported")
    delivery = deliver(sessions=sqlite_sessions, settings=settings, export_id=export_id, send=send)
    assert delivery.state == ExportState.FAILED and delivery.retry_after_s is None
    again = deliver(sessions=sqlite_sessions, settings=settings, export_id=export_id, send=send)
    assert not again.attempted and len(send.calls) == 1
    receipt = export_receipt(sessions=sqlite_sessions, export_id=export_id)
    assert receipt["attempts"] == 1 and receipt["last_reason"] == "0x0122 refused: SOP class not supported"


def test_delivered_export_is_never_sent_again(tmp_path: Path, seg_case: dict[str, Any], sqlite_sessions: Any) -> None:
    settings = unit_settings(tmp_path)
    export_id, _ = record_export(sessions=sqlite_sessions, settings=settings, path=seg_case["seg_path"])
    send = fake_send(Outcome.DELIVERED, 0xB000, "0xB000 warning: coercion of data elements")
    assert deliver(sessions=sqlite_sessions, settings=settings, export_id=export_id, send=send).state == "delivered"
    make_due(sqlite_sessions, export_id)
    assert not deliver(sessions=sqlite_sessions, settings=settings, export_id=export_id, send=send).attempted
    assert len(send.calls) == 1
    # Recording the same object again finds the same export.
    assert record_export(sessions=sqlite_sessions, settings=settings, path=seg_case["seg_path"]) == (export_id, False)
    assert not retry_export(sessions=sqlite_sessions, export_id=export_id)
    receipt = export_receipt(sessions=sqlite_sessions, export_id=export_id)
    assert receipt["last_reason"] == "0xB000 warning: coercion of data elements" and receipt["delivered_at"]


def test_transient_failures_past_the_deadline_give_up(
    tmp_path: Path, seg_case: dict[str, Any], sqlite_sessions: Any
) -> None:
    settings = unit_settings(tmp_path, export_retry_deadline_s=3600)
    export_id, _ = record_export(sessions=sqlite_sessions, settings=settings, path=seg_case["seg_path"])
    with sqlite_sessions.begin() as session:
        session.execute(
            update(Export).where(Export.id == export_id).values(pending_since=utc_now() - dt.timedelta(hours=2))
        )
    send = fake_send(Outcome.TRANSIENT, None, "cannot connect to 127.0.0.1:104")
    delivery = deliver(sessions=sqlite_sessions, settings=settings, export_id=export_id, send=send)
    assert delivery.state == ExportState.FAILED and delivery.retry_after_s is None
    reason = export_receipt(sessions=sqlite_sessions, export_id=export_id)["last_reason"]
    assert reason.startswith("gave up after 1 attempts over 2.0 h: cannot connect")
    # An operator's retry starts a new round with a fresh deadline.
    assert retry_export(sessions=sqlite_sessions, export_id=export_id)
    again = deliver(sessions=sqlite_sessions, settings=settings, export_id=export_id, send=send)
    assert again.state == ExportState.PENDING and again.retry_after_s == 30


def test_last_retry_lands_on_the_deadline(tmp_path: Path, seg_case: dict[str, Any], sqlite_sessions: Any) -> None:
    settings = unit_settings(tmp_path, export_retry_initial_s=600, export_retry_max_s=600, export_retry_deadline_s=3600)
    export_id, _ = record_export(sessions=sqlite_sessions, settings=settings, path=seg_case["seg_path"])
    with sqlite_sessions.begin() as session:
        session.execute(
            update(Export).where(Export.id == export_id).values(pending_since=utc_now() - dt.timedelta(seconds=3400))
        )
    delivery = deliver(
        sessions=sqlite_sessions,
        settings=settings,
        export_id=export_id,
        send=fake_send(Outcome.TRANSIENT, None, "timeout"),
    )
    assert delivery.state == ExportState.PENDING and 190 <= delivery.retry_after_s <= 200


def test_pending_export_long_overdue_is_found_for_resending(
    tmp_path: Path, seg_case: dict[str, Any], sqlite_sessions: Any
) -> None:
    settings = unit_settings(tmp_path)
    export_id, _ = record_export(sessions=sqlite_sessions, settings=settings, path=seg_case["seg_path"])
    assert due_exports(sessions=sqlite_sessions, overdue_s=300) == []  # just queued: its message is on its way
    later = utc_now() + dt.timedelta(seconds=301)
    assert due_exports(sessions=sqlite_sessions, overdue_s=300, now=later) == [export_id]
    deliver(sessions=sqlite_sessions, settings=settings, export_id=export_id, send=fake_send(Outcome.DELIVERED, 0))
    assert due_exports(sessions=sqlite_sessions, overdue_s=300, now=later) == []


def test_unreachable_pacs_is_a_transient_failure(tmp_path: Path, seg_case: dict[str, Any]) -> None:
    result = send_seg(path=seg_case["seg_path"], settings=unit_settings(tmp_path))  # nobody listens on that port
    assert result.outcome == Outcome.TRANSIENT and result.status is None
    assert result.reason.startswith("cannot connect to 127.0.0.1:")


def test_unreadable_file_is_a_permanent_failure(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    result = send_seg(path=junk, settings=unit_settings(tmp_path))
    assert result.outcome == Outcome.PERMANENT and "junk.dcm" in result.reason


# --- Orthanc as the PACS ------------------------------------------------------------------------------


def orthanc_executable() -> str:
    path = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    assert Path(path).exists(), "Orthanc is not installed (make system-deps)"
    return path


class Orthanc:
    """A throwaway Orthanc on fixed free ports; `start`/`stop` keep its ports and its stored data."""

    def __init__(self, folder: Path, **config: Any) -> None:
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        self.config = {
            "Name": "test-pacs",
            "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            **config,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, **config: Any) -> None:
        self.config.update(config)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "orthanc.json").write_text(json.dumps(self.config))
        log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen(
            [orthanc_executable(), str(self.folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

        def up() -> bool:
            assert self.process is not None and self.process.poll() is None, (self.folder / "orthanc.log").read_text()
            try:
                self.rest("/system")
                # The DICOM server may open after the REST one: a C-STORE sent in between fails to connect
                # (a transient failure) where the test expects Orthanc's own answer.
                socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(up, timeout=60)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def rest(self, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method="POST" if body is not None else "GET"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def instances_with_uid(self, sop_instance_uid: str) -> list[str]:
        found = self.rest("/tools/lookup", sop_instance_uid.encode())
        return [item["ID"] for item in found if item["Type"] == "Instance"]


@contextmanager
def orthanc(folder: Path, **config: Any) -> Iterator[Orthanc]:
    server = Orthanc(folder, **config)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def gatekeeper_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> Iterator[None]:
    """Run in-process `gatekeeper` commands with these settings."""
    for name, value in settings_env(settings).items():
        if name.startswith("GATEKEEPER_"):
            monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        yield
    finally:
        get_settings.cache_clear()


def export_settings(
    tmp_path: Path, postgres_db_url: str, redis_url: str, server: Orthanc, **overrides: Any
) -> Settings:
    return make_settings(
        tmp_path / "var",
        postgres_db_url,
        redis_url,
        pacs_host="127.0.0.1",
        pacs_port=server.dicom_port,
        pacs_ae_title="ORTHANC",
        # Generous: Orthanc's answer (e.g. its rejection of an unknown AE) took more than 5 s on a loaded machine
        # and was then recorded as a transient timeout. No test here waits for it to expire (a stopped Orthanc's
        # port refuses at once).
        export_timeout_s=60,
        export_queue=f"test.export.{tmp_path.name}.{free_port()}",
        **overrides,
    )


@pytest.mark.integration
def test_seg_arrives_in_orthanc_once_and_references_the_source_series(
    tmp_path: Path,
    seg_case: dict[str, Any],
    postgres_db_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upgrade(postgres_db_url)
    with orthanc(tmp_path / "orthanc") as server:
        server.start()
        for path in seg_case["ct_paths"]:
            server.rest("/instances", path.read_bytes())
        settings = export_settings(tmp_path, postgres_db_url, redis_url, server)
        with gatekeeper_env(monkeypatch, settings):
            assert main(["exports", "send", str(seg_case["seg_path"]), "--now", "--json"]) == 0
            receipt = json.loads(capsys.readouterr().out)
            assert receipt["state"] == "delivered" and receipt["attempts"] == 1
            assert receipt["attempt_log"][0]["status"] == "0x0000"
            # Sent again: the same export, nothing new sent.
            assert main(["exports", "send", str(seg_case["seg_path"]), "--now", "--json"]) == 0
            assert json.loads(capsys.readouterr().out)["attempts"] == 1
            assert main(["exports", "list", "--json"]) == 0
            listing = capsys.readouterr().out
        # The same object sent twice on the wire still leaves one instance in the PACS.
        assert send_seg(path=seg_case["seg_path"], settings=settings).outcome == Outcome.DELIVERED

        [instance] = server.instances_with_uid(seg_case["sop_instance_uid"])
        tags = server.rest(f"/instances/{instance}/simplified-tags")
        assert tags["Modality"] == "SEG" and tags["SeriesDescription"] == "AUTO LIVER SEG - UNREVIEWED"
        [referenced] = tags["ReferencedSeriesSequence"]
        assert referenced["SeriesInstanceUID"] == seg_case["source_series_instance_uid"]
        assert len(referenced["ReferencedInstanceSequence"]) == len(seg_case["ct_paths"])
        # In the PACS, the SEG sits in the CT's study, as a second series.
        [study] = server.rest("/studies")
        assert len(server.rest(f"/studies/{study}")["Series"]) == 2
        assert len(server.rest("/instances")) == len(seg_case["ct_paths"]) + 1
    rows = json.loads(listing)
    assert [row["state"] for row in rows] == ["delivered"]
    assert seg_case["patient_name"] not in listing


@pytest.mark.integration
@pytest.mark.slow
def test_orthanc_down_then_back_is_delivered_exactly_once_by_the_worker(
    tmp_path: Path,
    seg_case: dict[str, Any],
    postgres_db_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upgrade(postgres_db_url)
    db = Db(postgres_db_url)

    def export() -> Export | None:
        with db.sessions() as session:
            return session.scalar(select(Export))

    def outcomes() -> list[str]:
        with db.sessions() as session:
            return list(session.scalars(select(ExportAttempt.outcome).order_by(ExportAttempt.id)))

    with orthanc(tmp_path / "orthanc") as server:
        server.start()
        server.stop()  # the PACS goes down before our export
        settings = export_settings(
            tmp_path, postgres_db_url, redis_url, server, export_retry_initial_s=1, export_retry_max_s=2
        )
        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [gatekeeper_executable(), "worker"], env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            with gatekeeper_env(monkeypatch, settings):
                assert main(["exports", "send", str(seg_case["seg_path"])]) == 0
            capsys.readouterr()
            first = wait_for(lambda: (row := export()) is not None and row.attempts >= 1 and row, timeout=60)
            assert first.state == ExportState.PENDING and first.last_reason.startswith("cannot connect")
            server.start()
            delivered = wait_for(lambda: (row := export()).state == ExportState.DELIVERED and row, timeout=30)
            time.sleep(3)  # longer than the backoff: no further attempt may follow
            assert export().attempts == delivered.attempts
        finally:
            worker.terminate()
            worker.wait(timeout=30)
            log.close()
        history = outcomes()
        assert history.count("delivered") == 1 and history[-1] == "delivered"
        assert set(history[:-1]) == {"transient"} and len(history) == delivered.attempts >= 2
        assert len(server.instances_with_uid(seg_case["sop_instance_uid"])) == 1
        assert redis.Redis.from_url(redis_url).llen(settings.export_queue) == 0
    db.close()


@pytest.mark.integration
def test_orthanc_refusing_our_ae_fails_at_once_and_operator_retry_delivers(
    tmp_path: Path,
    seg_case: dict[str, Any],
    postgres_db_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upgrade(postgres_db_url)
    db = Db(postgres_db_url)
    broker = redis.Redis.from_url(redis_url)
    # Orthanc stores only from the modalities it knows, and it does not know us.
    with orthanc(tmp_path / "orthanc", DicomAlwaysAllowStore=False, DicomAlwaysAllowEcho=False) as server:
        server.start()
        settings = export_settings(tmp_path, postgres_db_url, redis_url, server)
        with gatekeeper_env(monkeypatch, settings):
            assert main(["exports", "send", str(seg_case["seg_path"]), "--now", "--json"]) == 1
            receipt = json.loads(capsys.readouterr().out)
            assert receipt["state"] == "failed" and receipt["attempts"] == 1 and receipt["last_status"] is None
            assert receipt["last_reason"] == (
                "association rejected permanently by the service-user: calling AE title not recognized"
            )
            assert broker.llen(settings.export_queue) == 0  # no retry is scheduled

            assert main(["exports", "list", "--state", "failed", "--json"]) == 0
            [row] = json.loads(capsys.readouterr().out)
            assert row["id"] == receipt["id"]

            assert main(["exports", "retry", "999999"]) == 2
            assert capsys.readouterr().err.splitlines()[-1] == "gatekeeper exports: error: no export with id 999999"

            # The PACS administrator adds us; the operator retries from the failed list.
            server.stop()
            server.start(DicomModalities={"gatekeeper": [settings.export_calling_ae_title(), "127.0.0.1", 104]})
            assert main(["exports", "retry", str(receipt["id"])]) == 0
            assert "pending again, queued" in capsys.readouterr().out
            assert broker.llen(settings.export_queue) == 1
        delivery = deliver(sessions=db.sessions, settings=settings, export_id=receipt["id"])  # what the worker does
        assert delivery.state == ExportState.DELIVERED
        assert export_receipt(sessions=db.sessions, export_id=receipt["id"])["attempts"] == 2
        assert len(server.instances_with_uid(seg_case["sop_instance_uid"])) == 1
    broker.delete(settings.export_queue)
    db.close()


def test_exports_retry_of_unknown_id_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'gatekeeper.db'}"
    upgrade(url)
    with gatekeeper_env(monkeypatch, Settings(storage_dir=tmp_path, database_url=url)):
        assert main(["exports", "retry", "7"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "gatekeeper exports: error: no export with id 7"


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate and its key for CN=localhost (also valid for 127.0.0.1), made with openssl."""
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN=localhost/O={name}",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


@pytest.mark.integration
def test_seg_is_delivered_over_mutual_tls_and_an_untrusted_pacs_is_refused(
    tmp_path: Path, seg_case: dict[str, Any]
) -> None:
    server_key, server_cert = self_signed(tmp_path, "pacs")
    client_key, client_cert = self_signed(tmp_path, "gatekeeper")
    stranger_key, stranger_cert = self_signed(tmp_path, "stranger")
    tls = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(server_cert),
        "DicomTlsPrivateKey": str(server_key),
        "DicomTlsTrustedCertificates": str(client_cert),
        "DicomTlsRemoteCertificateRequired": True,
    }
    with orthanc(tmp_path / "orthanc", **tls) as server:
        server.start()
        settings = unit_settings(
            tmp_path,
            pacs_port=server.dicom_port,
            pacs_ae_title="ORTHANC",
            pacs_tls=True,
            pacs_tls_ca_path=server_cert,
            pacs_tls_cert_path=client_cert,
            pacs_tls_key_path=client_key,
        )
        result = send_seg(path=seg_case["seg_path"], settings=settings)
        assert result.outcome == Outcome.DELIVERED, result
        assert len(server.instances_with_uid(seg_case["sop_instance_uid"])) == 1
        # A PACS whose certificate we do not trust gets nothing (transient: a certificate can be fixed).
        distrustful = settings.model_copy(update={"pacs_tls_ca_path": stranger_cert})
        refused = send_seg(path=seg_case["seg_path"], settings=distrustful)
        assert refused.outcome == Outcome.TRANSIENT and refused.status is None, refused
        assert "TLS handshake failed" in refused.reason
