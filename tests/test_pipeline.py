"""The pipeline's stages, routing table, state machine and sweeper, on SQLite with the real detector.

Series come in through the real listener (storescu → SQLite); the stages are called as the Celery
tasks call them; the segmenter is a stand-in with a known mask so the SEG route is deterministic.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from ingest_support import Db, ct_files, make_settings, running_listener, storescu, upgrade, wait_for
from sqlalchemy import select, update

from service import pipeline
from service.db.tables import (
    Export,
    ExportState,
    Instance,
    RouteReason,
    Series,
    SeriesEvent,
    SeriesScore,
    WorklistItem,
    utc_now,
)
from service.dicom_send import Outcome, SendResult
from service.gate import Finding, Gate, GateDecision
from service.inference import Detector
from service.lifecycle import SeriesState
from service.pacs_export import deliver
from service.pipeline import Next, RouteFacts, decide_route
from service.segmentation import Segmentation
from service.settings import Settings


class RecordingPublisher:
    """Stands in for the broker: remembers what was published."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def publish(self, *args: Any, **kwargs: Any) -> None:
        self.messages.append(args[0] if args else kwargs)


@dataclass
class StubSegmenter:
    """A segmenter whose liver is a fixed block (or nothing), so routing after segmentation is known."""

    liver: bool = True
    version: str = "stub-1"
    name: str = "stub liver segmenter"

    def segment(self, series: Any) -> Segmentation:
        mask = np.zeros(series.hu.shape, bool)
        if self.liver:
            k, rows, cols = series.hu.shape
            mask[k // 4 : 3 * k // 4, rows // 3 : rows // 2, cols // 4 : cols // 2] = True
        return Segmentation(
            series_instance_uid=series.series_instance_uid,
            mask=mask,
            slice_entropy=np.zeros(len(mask)),
            features=None,
            entropy=0.0,
            liver_volume_ml=float(mask.sum()) * 0.01,
        )


@pytest.fixture(scope="module")
def detector() -> Detector:
    from service.commands.score import DEFAULT_MODEL_DIR

    return Detector(DEFAULT_MODEL_DIR, batch=8)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("pipeline-phantoms")
    from service.commands.main import main

    folders = {}
    for name, anomaly, seed in (("normal", "none", 5), ("hip", "hip_prosthesis", 6)):
        assert (
            main(
                [
                    "phantom",
                    "--out",
                    str(out / name),
                    "--slices",
                    "24",
                    "--matrix",
                    "128",
                    "--seed",
                    str(seed),
                    "--anomaly",
                    anomaly,
                    "--quiet",
                ]
            )
            == 0
        )
        [folders[name]] = [p for p in (out / name).iterdir() if p.is_dir()]
    return folders


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Settings, Db]]:
    url = f"sqlite:///{tmp_path / 'gatekeeper.db'}"
    upgrade(url)
    settings = make_settings(
        tmp_path / "var",
        url,
        "memory://",
        quiet_period_s=0.5,
        pacs_host="127.0.0.1",
        pacs_ae_title="PACS",
        pacs_port=104,
        top_slices=3,
    )
    db = Db(url)
    yield settings, db
    db.close()


def ingest(settings: Settings, db: Db, folder: Path) -> int:
    """Push a series through the real listener (messages recorded, not sent); return its series id."""
    with running_listener(settings, publisher=RecordingPublisher()) as listener:
        assert storescu(listener.port, ct_files(folder)).returncode == 0
        uid = pydicom.dcmread(ct_files(folder)[0], stop_before_pixels=True).SeriesInstanceUID
        [series] = wait_for(lambda: [s for s in db.series(uid) if s.state == SeriesState.QUEUED], timeout=30)
    return series.id


def events(db: Db, series_id: int) -> list[SeriesEvent]:
    with db.sessions() as session:
        return list(
            session.scalars(select(SeriesEvent).where(SeriesEvent.series_id == series_id).order_by(SeriesEvent.id))
        )


def series_row(db: Db, series_id: int) -> Series:
    with db.sessions() as session:
        series = session.get(Series, series_id)
        assert series is not None
        return series


# --- routing table and state machine ----------------------------------------------------------------


def decision(reason: str | None, *fired: str) -> GateDecision:
    """A gate decision with `reason` (None: auto) and a fired finding per name in `fired`."""
    findings = tuple(Finding(name, 1.0, 0.5, True, (3, 7), f"{name} fired") for name in fired)
    return GateDecision(reason is not None, RouteReason(reason) if reason else None, findings, None, None, "test")


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        # No gate decision: forward mode (our segmenter does not run), an unreadable series.
        (RouteFacts(flagged=False), ("auto", None)),
        (RouteFacts(flagged=True), ("worklist", "anomaly")),
        (RouteFacts(geometry_findings=[{"code": "gap"}], flagged=False), ("worklist", "geometry")),
        (RouteFacts(geometry_findings=[{"code": "gap"}], unreadable="one slice"), ("worklist", "geometry")),
        (RouteFacts(unreadable="one slice"), ("worklist", "unreadable")),
        # After segmentation the gate decides; its reason is the route reason, whatever it is.
        (RouteFacts(flagged=True, gate=decision(None), liver_found=True), ("auto", None)),
        (RouteFacts(geometry_findings=[{"code": "gap"}], gate=decision(None), liver_found=True), ("auto", None)),
        (RouteFacts(flagged=False, gate=decision("anomaly", "gan"), liver_found=True), ("worklist", "anomaly")),
        (RouteFacts(gate=decision("gate_evidence", "tta_dice"), liver_found=True), ("worklist", "gate_evidence")),
        (RouteFacts(gate=decision("no_liver", "no_liver"), liver_found=False), ("worklist", "no_liver")),
        # A safety net under the gate: no liver, no SEG.
        (RouteFacts(gate=decision(None), liver_found=False), ("worklist", "no_liver")),
        # Off-target series, off_target_routing "withhold": withheld (route None) with the off-target reason.
        (
            RouteFacts(gate=decision("not_abdomen", "not_abdomen"), off_target_routing="withhold"),
            (None, "not_abdomen"),
        ),
        (
            RouteFacts(gate=decision("anomaly", "gan", "no_liver"), liver_found=False, off_target_routing="withhold"),
            (None, "no_liver"),
        ),
        (RouteFacts(gate=decision(None), liver_found=False, off_target_routing="withhold"), (None, "no_liver")),
        (
            RouteFacts(gate=decision("liver_partial", "liver_partial"), off_target_routing="worklist"),
            ("worklist", "liver_partial"),
        ),
        # ... but a series the model applies to still goes to the worklist.
        (
            RouteFacts(gate=decision("anomaly", "gan"), liver_found=True, off_target_routing="withhold"),
            ("worklist", "anomaly"),
        ),
    ],
)
def test_routing_rules_pick_the_first_reason_that_applies(facts: RouteFacts, expected: tuple) -> None:
    route, reason = decide_route(facts)
    assert (route.value if route else None, reason.value if reason else None) == expected


# --- the stages ---------------------------------------------------------------------------------------


def test_normal_series_is_scored_routed_auto_segmented_and_exported(
    env: tuple[Settings, Db], phantoms: dict[str, Path], detector: Detector
) -> None:
    settings, db = env
    series_id = ingest(settings, db, phantoms["normal"])
    sessions = db.sessions

    assert pipeline.start(sessions=sessions, series_id=series_id, worker="test") == Next("score", series_id)
    assert pipeline.start(sessions=sessions, series_id=series_id, worker="test") == pipeline.DONE  # duplicate
    assert pipeline.score(sessions=sessions, settings=settings, series_id=series_id, detector=detector) == Next(
        "segment", series_id
    )
    # A redelivered score message finds the series routed: nothing is scored or routed again.
    assert pipeline.score(sessions=sessions, settings=settings, series_id=series_id, detector=detector) == pipeline.DONE
    with db.sessions() as session:
        [score] = session.scalars(select(SeriesScore).where(SeriesScore.series_id == series_id)).all()
    assert not score.flagged and score.model_version == detector.version and len(score.slices) == 24
    assert [s["index"] for s in score.slices] == list(range(24))
    assert len(score.top_slices) == 3 and score.top_slices[0]["score"] == max(s["score"] for s in score.slices)
    for entry in score.top_slices:
        assert set(entry) == {"index", "score", "residual_map", "sop_instance_uid"}
        residual = np.load(settings.storage_dir / entry["residual_map"])
        assert residual.shape == (64, 64) and residual.dtype == np.float16
        assert entry["sop_instance_uid"] == score.slices[entry["index"]]["sop_instance_uid"]

    [nxt] = pipeline.segment(sessions=sessions, settings=settings, series_id=series_id, segmenter=StubSegmenter())
    assert nxt.stage == "export"
    assert series_row(db, series_id).state == SeriesState.EXPORTING
    with db.sessions() as session:
        export = session.get(Export, nxt.id)
    seg = pydicom.dcmread(settings.storage_dir / export.path)
    assert seg.Modality == "SEG" and export.series_id == series_id
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_row(db, series_id).series_instance_uid

    def delivered(*, path: Path, settings: Settings) -> SendResult:
        return SendResult(
            outcome=Outcome.DELIVERED,
            status=0,
            reason=None,
            destination="PACS@127.0.0.1:104",
            started_at=utc_now(),
            duration_s=0.01,
        )

    assert deliver(sessions=sessions, settings=settings, export_id=nxt.id, send=delivered).state == "delivered"
    pipeline.export_settled(sessions=sessions, export_id=nxt.id)
    series = series_row(db, series_id)
    assert (series.state, series.route, series.route_reason) == (SeriesState.DELIVERED, "auto", None)
    kinds = [e.kind for e in events(db, series_id)]
    assert kinds[-5:] == ["scoring", "scored", "segmenting", "exporting", "delivered"]
    # The gate decided after segmentation; the "exporting" event says on what and with which models.
    [exporting] = [e for e in events(db, series_id) if e.kind == "exporting"]
    assert exporting.detail["route"] == "auto" and exporting.detail["gate"]["manual"] is False
    assert exporting.detail["gate_version"] == "rules-only" and exporting.detail["segmenter_version"] == "stub-1"
    assert exporting.detail["detector_version"] == detector.version
    [gan] = [f for f in exporting.detail["gate"]["findings"] if f["signal"] == "gan"]
    assert gan["fired"] is False and gan["words"].startswith("GAN anomaly score")


def test_anomalous_series_is_segmented_and_goes_to_the_worklist_with_a_draft_never_sent(
    env: tuple[Settings, Db], phantoms: dict[str, Path], detector: Detector
) -> None:
    settings, db = env
    series_id = ingest(settings, db, phantoms["hip"])
    pipeline.start(sessions=db.sessions, series_id=series_id, worker="test")
    # Every readable series is segmented; the gate decides after.
    assert pipeline.score(sessions=db.sessions, settings=settings, series_id=series_id, detector=detector) == Next(
        "segment", series_id
    )
    assert series_row(db, series_id).state == SeriesState.SEGMENTING
    assert (
        pipeline.segment(sessions=db.sessions, settings=settings, series_id=series_id, segmenter=StubSegmenter()) == []
    )
    series = series_row(db, series_id)
    assert (series.state, series.route, series.route_reason) == (SeriesState.WORKLISTED, "worklist", "anomaly")
    with db.sessions() as session:
        [item] = session.scalars(select(WorklistItem)).all()
        score = session.scalar(select(SeriesScore))
        assert session.scalar(select(Export)) is None  # stored, not sent
    assert item.series_id == series_id and item.reason == RouteReason.ANOMALY and item.status == "open"
    assert score.flagged and score.score > score.threshold and len(score.slices) == 24
    # The item says why in plain words, and where the draft lies.
    gate = item.detail["gate"]
    assert gate["manual"] and gate["reason"] == "anomaly" and gate["gate_version"] == "rules-only"
    [gan] = [f for f in gate["findings"] if f["fired"]]
    assert gan["signal"] == "gan" and gan["value"] == pytest.approx(score.score, abs=1e-5)
    assert "GAN anomaly score" in gan["words"] and gan["threshold"] == pytest.approx(score.threshold, abs=1e-5)
    assert (item.detail["segmenter_version"], item.detail["detector_version"]) == ("stub-1", detector.version)
    draft = settings.storage_dir / item.detail["draft"]
    assert draft.name == "liver-seg-draft-stub-1.dcm" and pydicom.dcmread(draft).Modality == "SEG"
    assert not list(draft.parent.glob("liver-seg-stub-1.dcm"))  # no deliverable SEG was written
    routed = [e for e in events(db, series_id) if e.kind == "routed"]
    assert len(routed) == 1 and routed[0].detail["reason"] == "anomaly"
    assert routed[0].detail["gate_version"] == "rules-only" and routed[0].detail["detector_version"]
    assert series.patient_name and all(series.patient_name not in str(e.detail) for e in events(db, series_id))
    # A redelivered segment message finds the series worklisted: nothing is written or moved again.
    assert (
        pipeline.segment(sessions=db.sessions, settings=settings, series_id=series_id, segmenter=StubSegmenter()) == []
    )
    assert [e.kind for e in events(db, series_id)].count("routed") == 1


def test_the_gate_given_to_the_segment_stage_decides(
    env: tuple[Settings, Db], phantoms: dict[str, Path], detector: Detector
) -> None:
    """A gate that stops a normal series: the worklist reason is the gate's, whatever it is."""
    settings, db = env

    class Stopping(Gate):
        def assess(self, **kwargs: Any) -> Any:
            assessment = Gate.rules_only().assess(**kwargs)
            finding = Finding("tta_dice", 0.81, 0.93, True, (40, 52), "segmentations disagree on slices 40–52")
            assessment.decision = GateDecision(True, RouteReason.ANOMALY, (finding,), 3.2, 2.0, "gate-test-1")
            return assessment

    series_id = ingest(settings, db, phantoms["normal"])
    pipeline.start(sessions=db.sessions, series_id=series_id, worker="test")
    pipeline.score(sessions=db.sessions, settings=settings, series_id=series_id, detector=detector)
    gate = Stopping({"version": "gate-test-1"})
    assert (
        pipeline.segment(
            sessions=db.sessions, settings=settings, series_id=series_id, segmenter=StubSegmenter(), gate=gate
        )
        == []
    )
    assert series_row(db, series_id).state == SeriesState.WORKLISTED
    with db.sessions() as session:
        [item] = session.scalars(select(WorklistItem)).all()
        assert session.scalar(select(Export)) is None
    assert item.detail["gate_version"] == "gate-test-1" and item.detail["gate"]["fused"] == 3.2
    assert item.detail["gate"]["findings"][0]["words"] == "segmentations disagree on slices 40–52"
    assert item.detail["gate"]["findings"][0]["slices"] == [40, 52]


def test_no_liver_found_goes_to_the_worklist(
    env: tuple[Settings, Db], phantoms: dict[str, Path], detector: Detector
) -> None:
    settings, db = env
    series_id = ingest(settings, db, phantoms["normal"])
    pipeline.start(sessions=db.sessions, series_id=series_id, worker="test")
    pipeline.score(sessions=db.sessions, settings=settings, series_id=series_id, detector=detector)
    assert (
        pipeline.segment(
            sessions=db.sessions, settings=settings, series_id=series_id, segmenter=StubSegmenter(liver=False)
        )
        == []
    )
    series = series_row(db, series_id)
    assert (series.state, series.route, series.route_reason) == (SeriesState.WORKLISTED, "worklist", "no_liver")
    with db.sessions() as session:
        assert session.scalar(select(Export)) is None
        [item] = session.scalars(select(WorklistItem)).all()
    assert item.reason == "no_liver" and item.detail["draft"] is None  # an empty mask: no draft either
    assert [f["words"] for f in item.detail["gate"]["findings"] if f["fired"]] == [
        "no liver in the field of view (0 ml found)"
    ]


def test_off_target_series_is_withheld_when_so_configured(
    env: tuple[Settings, Db], phantoms: dict[str, Path], detector: Detector
) -> None:
    settings, db = env
    settings = settings.model_copy(update={"off_target_routing": "withhold"})
    series_id = ingest(settings, db, phantoms["normal"])
    pipeline.start(sessions=db.sessions, series_id=series_id, worker="test")
    pipeline.score(sessions=db.sessions, settings=settings, series_id=series_id, detector=detector)
    assert (
        pipeline.segment(
            sessions=db.sessions, settings=settings, series_id=series_id, segmenter=StubSegmenter(liver=False)
        )
        == []
    )
    series = series_row(db, series_id)
    # Kept with its reason; nothing sent, not on the worklist.
    assert (series.state, series.route, series.route_reason) == (SeriesState.WITHHELD, None, "no_liver")
    with db.sessions() as session:
        assert session.scalar(select(Export)) is None and session.scalar(select(WorklistItem)) is None
    [withheld] = [e for e in events(db, series_id) if e.kind == "withheld"]
    assert withheld.detail["route"] == "withheld" and withheld.detail["reason"] == "no_liver"
    assert withheld.detail["gate"]["reason"] == "no_liver" and withheld.detail["segmenter_version"] == "stub-1"
    assert not any((settings.storage_dir / "results" / str(series_id)).glob("liver-*.dcm"))


def test_unreadable_series_goes_to_the_worklist(
    env: tuple[Settings, Db], phantoms: dict[str, Path], detector: Detector
) -> None:
    settings, db = env
    series_id = ingest(settings, db, phantoms["normal"])
    with db.sessions() as session:  # a stored file goes bad on disk
        path = settings.storage_dir / session.scalars(select(Instance.relative_path)).first()
    path.write_bytes(path.read_bytes()[:2000])
    pipeline.start(sessions=db.sessions, series_id=series_id, worker="test")
    pipeline.score(sessions=db.sessions, settings=settings, series_id=series_id, detector=detector)
    series = series_row(db, series_id)
    assert (series.state, series.route_reason) == (SeriesState.WORKLISTED, "unreadable")


def test_sweeper_requeues_a_stuck_series_then_gives_up(env: tuple[Settings, Db], phantoms: dict[str, Path]) -> None:
    settings, db = env
    settings = settings.model_copy(update={"pipeline_stuck_after_s": 60, "pipeline_max_requeues": 2})
    series_id = ingest(settings, db, phantoms["normal"])
    pipeline.start(sessions=db.sessions, series_id=series_id, worker="test")  # the worker then dies
    publisher = RecordingPublisher()
    assert pipeline.sweep(sessions=db.sessions, settings=settings, publisher=publisher).requeued == []
    for round_ in range(1, 4):
        later = utc_now() + dt.timedelta(seconds=61 * round_)
        report = pipeline.sweep(sessions=db.sessions, settings=settings, publisher=publisher, now=later)
        if round_ <= 2:
            assert report.requeued == [series_id]
    assert publisher.messages == [Next("score", series_id)] * 2
    series = series_row(db, series_id)
    assert (series.state, series.route_reason) == (SeriesState.WORKLISTED, "unreadable")
    assert [e.kind for e in events(db, series_id)][-3:] == ["requeued_scoring", "requeued_scoring", "gave_up"]


def test_sweeper_settles_the_series_of_a_delivered_export(
    env: tuple[Settings, Db], phantoms: dict[str, Path], detector: Detector
) -> None:
    settings, db = env
    series_id = ingest(settings, db, phantoms["normal"])
    pipeline.start(sessions=db.sessions, series_id=series_id, worker="test")
    pipeline.score(sessions=db.sessions, settings=settings, series_id=series_id, detector=detector)
    [nxt] = pipeline.segment(sessions=db.sessions, settings=settings, series_id=series_id, segmenter=StubSegmenter())
    with db.sessions.begin() as session:  # delivered, but the worker died before moving the series
        session.execute(update(Export).where(Export.id == nxt.id).values(state=ExportState.DELIVERED.value))
    report = pipeline.sweep(sessions=db.sessions, settings=settings, publisher=RecordingPublisher())
    assert report.settled == [nxt.id] and series_row(db, series_id).state == SeriesState.DELIVERED


def test_both_formats_export_a_seg_and_an_rtstruct_and_the_series_settles_when_both_have(
    env: tuple[Settings, Db], phantoms: dict[str, Path], detector: Detector
) -> None:
    from service.pacs_export import retry_export

    settings, db = env
    settings = settings.model_copy(update={"export_format": "both", "rtstruct_roi_name": "Liver (auto)"})
    series_id = ingest(settings, db, phantoms["normal"])
    pipeline.start(sessions=db.sessions, series_id=series_id, worker="test")
    pipeline.score(sessions=db.sessions, settings=settings, series_id=series_id, detector=detector)
    nexts = pipeline.segment(sessions=db.sessions, settings=settings, series_id=series_id, segmenter=StubSegmenter())
    assert [n.stage for n in nexts] == ["export", "export"] and series_row(db, series_id).state == SeriesState.EXPORTING
    with db.sessions() as session:
        exports = [session.get(Export, n.id) for n in nexts]
    objects = [pydicom.dcmread(settings.storage_dir / e.path) for e in exports]
    assert [o.Modality for o in objects] == ["SEG", "RTSTRUCT"]
    assert [e.sop_class_uid for e in exports] == [str(o.SOPClassUID) for o in objects]
    assert objects[1].StructureSetROISequence[0].ROIName == "Liver (auto)"
    uid = series_row(db, series_id).series_instance_uid
    rt_series = objects[1].ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert rt_series.RTReferencedSeriesSequence[0].SeriesInstanceUID == uid

    def sent(outcome: Outcome) -> Any:
        def send(*, path: Path, settings: Settings) -> SendResult:
            status, reason = (0, None) if outcome == Outcome.DELIVERED else (0x0122, "SOP class not supported")
            return SendResult(
                outcome=outcome, status=status, reason=reason, destination="PACS", started_at=utc_now(), duration_s=0
            )

        return send

    seg_id, rtstruct_id = (n.id for n in nexts)
    deliver(sessions=db.sessions, settings=settings, export_id=seg_id, send=sent(Outcome.DELIVERED))
    pipeline.export_settled(sessions=db.sessions, export_id=seg_id)
    assert series_row(db, series_id).state == SeriesState.EXPORTING  # the RTSTRUCT is still pending
    deliver(sessions=db.sessions, settings=settings, export_id=rtstruct_id, send=sent(Outcome.PERMANENT))
    pipeline.export_settled(sessions=db.sessions, export_id=rtstruct_id)
    assert series_row(db, series_id).state == SeriesState.EXPORT_FAILED  # one failed for good
    assert retry_export(sessions=db.sessions, export_id=rtstruct_id)
    assert series_row(db, series_id).state == SeriesState.EXPORTING
    deliver(sessions=db.sessions, settings=settings, export_id=rtstruct_id, send=sent(Outcome.DELIVERED))
    pipeline.export_settled(sessions=db.sessions, export_id=rtstruct_id)
    assert series_row(db, series_id).state == SeriesState.DELIVERED
    kinds = [e.kind for e in events(db, series_id)]
    assert kinds[-4:] == ["exporting", "export_failed", "export_retried", "delivered"], kinds


def test_rtstruct_format_exports_the_rtstruct_only(
    env: tuple[Settings, Db], phantoms: dict[str, Path], detector: Detector
) -> None:
    settings, db = env
    settings = settings.model_copy(update={"export_format": "rtstruct"})
    series_id = ingest(settings, db, phantoms["normal"])
    pipeline.start(sessions=db.sessions, series_id=series_id, worker="test")
    pipeline.score(sessions=db.sessions, settings=settings, series_id=series_id, detector=detector)
    [nxt] = pipeline.segment(sessions=db.sessions, settings=settings, series_id=series_id, segmenter=StubSegmenter())
    with db.sessions() as session:
        export = session.get(Export, nxt.id)
    assert pydicom.dcmread(settings.storage_dir / export.path).Modality == "RTSTRUCT"
    assert export.sop_class_uid == pydicom.uid.RTStructureSetStorage
    # A redelivered segment message finds the series exporting: nothing is written or queued again.
    assert (
        pipeline.segment(sessions=db.sessions, settings=settings, series_id=series_id, segmenter=StubSegmenter()) == []
    )
