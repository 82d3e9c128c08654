"""Forward mode: the auto route sends the series to an external auto-segmentation node instead of segmenting.

The node is a throwaway Orthanc (its REST API tells what arrived) or, to choose the response
statuses, a pynetdicom storage SCP; series come in through the real listener (storescu → SQLite).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from celery import Celery
from ingest_support import (
    Db,
    ct_files,
    free_port,
    make_phantom,
    make_settings,
    running_listener,
    storescu,
    upgrade,
    wait_for,
)
from pydantic import ValidationError
from pynetdicom import AE, StoragePresentationContexts, evt
from sqlalchemy import select, update
from test_pacs_export import Orthanc, orthanc

from service import pipeline
from service.celery_app import SEGMENT_SERIES_TASK
from service.db.tables import Series, SeriesEvent, utc_now
from service.dicom_send import Destination, Outcome, send_files
from service.lifecycle import SeriesState
from service.pipeline.tasks import register_pipeline_tasks
from service.settings import Settings, get_settings, load_settings_or_exit

FORWARD_DETAIL_KEYS = {"destination", "instances", "duration_s", "reason"}


class RecordingPublisher:
    """Stands in for the broker: remembers what was published."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def publish(self, nxt: Any, **options: Any) -> None:
        self.messages.append(nxt)


class NoModels:
    """A worker's models that must not be loaded in forward mode."""

    def detector(self) -> Any:
        raise AssertionError("the detector was loaded")

    def segmenter(self) -> Any:
        raise AssertionError("the segmenter was loaded in forward mode")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 12-slice 64² phantom CT series folder."""
    [folder] = make_phantom(tmp_path_factory.mktemp("forward-phantom"), slices=12, seed=21, matrix=64)
    return folder


@pytest.fixture
def database(tmp_path: Path) -> Iterator[tuple[str, Db]]:
    url = f"sqlite:///{tmp_path / 'gatekeeper.db'}"
    upgrade(url)
    db = Db(url)
    yield url, db
    db.close()


def forward_settings(tmp_path: Path, url: str, *, port: int, ae_title: str = "ORTHANC") -> Settings:
    """Forward mode to `ae_title` at 127.0.0.1:`port`; no PACS configured (forward mode needs none)."""
    return make_settings(
        tmp_path / "var",
        url,
        "memory://",
        # Long enough that a loaded machine's pauses between the instances of one storescu association
        # do not complete the series early (a later instance would then supersede that version).
        quiet_period_s=3.0,
        segmentation_mode="forward",
        forward_host="127.0.0.1",
        forward_port=port,
        forward_ae_title=ae_title,
        # Sized for a loaded 2-core machine: Orthanc's answer (even a rejection) can take seconds
        # there. No test here waits for this timeout to expire (a dead port is refused at once).
        export_timeout_s=60,
    )


def routed_auto(settings: Settings, db: Db, folder: Path) -> int:
    """Push a series through the real listener and put it where the route leaves it: `segmenting`."""
    with running_listener(settings, publisher=RecordingPublisher()) as listener:
        assert storescu(listener.port, ct_files(folder)).returncode == 0
        uid = pydicom.dcmread(ct_files(folder)[0], stop_before_pixels=True).SeriesInstanceUID
        [series] = wait_for(lambda: [s for s in db.series(uid) if s.state == SeriesState.QUEUED], timeout=30)
    with db.sessions.begin() as session:
        session.execute(
            update(Series).where(Series.id == series.id).values(state=SeriesState.SEGMENTING.value, route="auto")
        )
    return series.id


def series_and_events(db: Db, series_id: int) -> tuple[Series, list[SeriesEvent]]:
    with db.sessions() as session:
        series = session.get(Series, series_id)
        events = list(
            session.scalars(select(SeriesEvent).where(SeriesEvent.series_id == series_id).order_by(SeriesEvent.id))
        )
    assert series is not None
    return series, events


def sop_instance_uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}


def series_in_orthanc(server: Orthanc, series_instance_uid: str) -> set[str]:
    """SOP Instance UIDs that Orthanc holds for this series."""
    found = [
        item["ID"] for item in server.rest("/tools/lookup", series_instance_uid.encode()) if item["Type"] == "Series"
    ]
    return {
        instance["MainDicomTags"]["SOPInstanceUID"]
        for series in found
        for instance in server.rest(f"/series/{series}/instances")
    }


@contextmanager
def store_scp(status_of: Callable[[int], int], ae_title: str = "SEGNODE") -> Iterator[int]:
    """A pynetdicom storage SCP that answers the n-th C-STORE (from 1) with `status_of(n)`; yields its port."""
    received: list[str] = []

    def handle_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return status_of(len(received))  # the status's meaning is what the test checks

    ae = AE(ae_title=ae_title)
    ae.supported_contexts = StoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        yield port
    finally:
        server.shutdown()


# --- settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["forward_host", "forward_ae_title"])
def test_forward_mode_without_its_destination_is_refused_naming_the_field(tmp_path: Path, missing: str) -> None:
    values = {
        "storage_dir": tmp_path,
        "segmentation_mode": "forward",
        "forward_host": "segnode.example.org",
        "forward_ae_title": "SEGNODE",
        missing: "",
    }
    with pytest.raises(ValidationError, match=f"{missing} is empty; set GATEKEEPER_{missing.upper()}"):
        Settings(**values)


def test_forward_mode_without_forward_host_exits_2_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GATEKEEPER_SEGMENTATION_MODE", "forward")
    monkeypatch.setenv("GATEKEEPER_FORWARD_AE_TITLE", "SEGNODE")
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as excinfo:
            load_settings_or_exit()
    finally:
        get_settings.cache_clear()
    assert excinfo.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "gatekeeper: invalid settings: segmentation_mode is 'forward' but forward_host is empty; "
        "set GATEKEEPER_FORWARD_HOST to the external segmentation node's host"
    ]


def test_internal_mode_is_the_default_and_needs_no_forward_destination(tmp_path: Path) -> None:
    settings = Settings(storage_dir=tmp_path)
    assert settings.segmentation_mode == "internal" and settings.forward_host == ""


# --- send_files: one association, the worst outcome wins ----------------------------------------------


def test_every_instance_is_stored_over_one_association(tmp_path: Path, phantom: Path) -> None:
    settings = Settings(storage_dir=tmp_path, export_timeout_s=5)
    with store_scp(lambda n: 0x0000) as port:
        result = send_files(
            paths=ct_files(phantom), destination=Destination("SEGNODE", "127.0.0.1", port), settings=settings
        )
    assert (result.outcome, result.status, result.reason) == (Outcome.DELIVERED, 0x0000, None)
    assert result.destination == f"SEGNODE@127.0.0.1:{port}"


def test_some_instances_out_of_resources_is_transient_and_says_how_many(tmp_path: Path, phantom: Path) -> None:
    settings = Settings(storage_dir=tmp_path, export_timeout_s=5)
    with store_scp(lambda n: 0xA700 if n in (3, 7) else 0x0000) as port:
        result = send_files(
            paths=ct_files(phantom), destination=Destination("SEGNODE", "127.0.0.1", port), settings=settings
        )
    assert (result.outcome, result.status) == (Outcome.TRANSIENT, 0xA700)
    assert result.reason == "2 of 12 instances failed; the worst: 0xA700 refused: out of resources"


def test_a_permanent_failure_outweighs_transient_ones(tmp_path: Path, phantom: Path) -> None:
    settings = Settings(storage_dir=tmp_path, export_timeout_s=5)
    with store_scp(lambda n: {2: 0xA700, 5: 0xC000}.get(n, 0x0000)) as port:
        result = send_files(
            paths=ct_files(phantom), destination=Destination("SEGNODE", "127.0.0.1", port), settings=settings
        )
    assert (result.outcome, result.status) == (Outcome.PERMANENT, 0xC000)
    assert result.reason == "2 of 12 instances failed; the worst: 0xC000 error: cannot understand"


def test_an_unreadable_file_fails_before_anything_is_sent(tmp_path: Path, phantom: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    calls: list[int] = []
    with store_scp(lambda n: calls.append(n) or 0x0000) as port:
        result = send_files(
            paths=[*ct_files(phantom), junk],
            destination=Destination("SEGNODE", "127.0.0.1", port),
            settings=Settings(storage_dir=tmp_path, export_timeout_s=5),
        )
    assert result.outcome == Outcome.PERMANENT and "junk.dcm" in result.reason and calls == []


# --- the segment stage in forward mode ----------------------------------------------------------------


@pytest.mark.integration
def test_forwarded_series_arrives_whole_and_the_series_is_delivered(
    tmp_path: Path, phantom: Path, database: tuple[str, Db]
) -> None:
    url, db = database
    with orthanc(tmp_path / "orthanc") as server:
        server.start()
        settings = forward_settings(tmp_path, url, port=server.dicom_port)
        series_id = routed_auto(settings, db, phantom)
        # Run the worker's segment task as Celery would: no segmenter may be loaded.
        app = Celery("test-forward", broker="memory://")
        models: Any = NoModels()
        register_pipeline_tasks(app, settings=settings, sessions=db.sessions, models=models)
        app.tasks[SEGMENT_SERIES_TASK](series_id)
        series, events = series_and_events(db, series_id)
        arrived = series_in_orthanc(server, series.series_instance_uid)
        # A duplicate message finds the series delivered and sends nothing.
        assert pipeline.segment(sessions=db.sessions, settings=settings, series_id=series_id, segmenter=None) == []
        assert len(server.rest("/instances")) == len(ct_files(phantom))
    assert arrived == sop_instance_uids(ct_files(phantom))
    assert (series.state, series.route) == (SeriesState.DELIVERED, "auto")
    [forwarded] = [e for e in events if e.kind == "forwarded"]
    assert forwarded.detail["destination"] == f"ORTHANC@127.0.0.1:{server.dicom_port}"
    assert forwarded.detail["instances"] == 12 and forwarded.detail["reason"] is None
    assert set(forwarded.detail) == FORWARD_DETAIL_KEYS
    assert series.patient_name and all(series.patient_name not in str(e.detail) for e in events)


@pytest.mark.integration
def test_node_refusing_our_ae_fails_the_series_with_the_reason(
    tmp_path: Path, phantom: Path, database: tuple[str, Db]
) -> None:
    url, db = database
    # Orthanc stores only from the modalities it knows, and it does not know us.
    with orthanc(tmp_path / "orthanc", DicomAlwaysAllowStore=False, DicomAlwaysAllowEcho=False) as server:
        server.start()
        settings = forward_settings(tmp_path, url, port=server.dicom_port)
        series_id = routed_auto(settings, db, phantom)
        assert pipeline.segment(sessions=db.sessions, settings=settings, series_id=series_id, segmenter=None) == []
        assert server.rest("/instances") == []
    series, events = series_and_events(db, series_id)
    assert series.state == SeriesState.EXPORT_FAILED
    assert events[-1].kind == "export_failed"
    assert events[-1].detail["reason"] == (
        "association rejected permanently by the service-user: calling AE title not recognized"
    )


def test_node_down_leaves_the_series_to_the_sweeper(tmp_path: Path, phantom: Path, database: tuple[str, Db]) -> None:
    url, db = database
    settings = forward_settings(tmp_path, url, port=free_port())  # nobody listens there
    settings = settings.model_copy(update={"pipeline_stuck_after_s": 60})
    series_id = routed_auto(settings, db, phantom)
    assert pipeline.segment(sessions=db.sessions, settings=settings, series_id=series_id, segmenter=None) == []
    series, events = series_and_events(db, series_id)
    assert series.state == SeriesState.SEGMENTING
    assert events[-1].kind == "forward_failed" and events[-1].detail["reason"].startswith("cannot connect to")
    publisher = RecordingPublisher()
    report = pipeline.sweep(
        sessions=db.sessions, settings=settings, publisher=publisher, now=utc_now() + dt.timedelta(seconds=61)
    )
    assert report.requeued == [series_id] and publisher.messages == [pipeline.Next("segment", series_id)]
