"""Stage *segment*: the segmenter's liver, the gate's decision, then the PACS objects or a kept draft.

Steps, in order: `_read_series` (the series row, its files and the detector's newest score),
`_assess` (load the volume; the gate segments it and decides; `ROUTING_RULES` give the route),
then either `_keep_draft` (worklist or withheld: a draft SEG, never sent) or the auto route's end
in `service.pipeline.auto_route` (the SEG and/or RT Structure Set, their `Export` rows, `exporting`;
shadow mode: `withheld`). Forward mode hands the series to `service.pipeline.forwarding.forward` instead.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import dicom_series, metrics
from service.celery_app import DONE, Next
from service.db.tables import Route, RouteReason, SeriesScore, utc_now
from service.gate import DetectorEvidence, Gate, GateDecision
from service.lifecycle import SeriesState, transition
from service.pipeline.auto_route import record_auto, write_auto_objects
from service.pipeline.forwarding import forward
from service.pipeline.routing import RouteFacts, decide_route
from service.pipeline.store import (
    cannot_segment,
    draft_path,
    instance_paths,
    load_stored_series,
    relative_to_storage,
    series_row,
    to_worklist,
    write_liver_seg,
)
from service.settings import Settings

if TYPE_CHECKING:  # the heavy objects come in as arguments, built once per worker process
    from service.segmentation import Segmentation, Segmenter

log = logging.getLogger(__name__)

S = SeriesState


@dataclass(frozen=True)
class _SegmentInput:
    """What the segment stage reads of a series version before it works.

    Attributes:
        version: `Series.version`, the source series version the objects name.
        series_instance_uid: the series' Series Instance UID (shadow review selection).
        geometry_findings: the ingest geometry check's findings.
        evidence: the detector's newest `SeriesScore` as the gate reads it; None if never scored.
        paths: the stored file of every instance, by SOP Instance UID.
    """

    version: int
    series_instance_uid: str
    geometry_findings: list[dict[str, Any]]
    evidence: DetectorEvidence | None
    paths: dict[str, Path]


@dataclass(frozen=True)
class _Assessed:
    """A segmented series, the gate's decision on it and the route `ROUTING_RULES` give: what the last steps write.

    Attributes:
        route: `Route.AUTO`, `Route.WORKLIST`, or None (withheld).
        reason: the route's reason; None on the auto route.
        versions: the gate, segmenter and detector versions and the worker, for the events.
        headers: the instances' headers (no pixels), in volume order, for the DICOM objects.
        clock: when the gate started, for the stage's duration.
    """

    series_id: int
    read: _SegmentInput
    segmentation: Segmentation
    decision: GateDecision
    route: Route | None
    reason: RouteReason | None
    versions: dict[str, Any]
    headers: list[Any]
    segmenter: Segmenter
    clock: dt.datetime


def segment(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    series_id: int,
    segmenter: Segmenter | None,
    gate: Gate | None = None,
    worker: str | None = None,
) -> list[Next]:
    """Stage *segment*: segment the liver, let the gate decide, then deliver or keep a draft.

    `gate`: the active gate (None: `Gate.rules_only()`); `worker` (the worker's node name) is
    recorded in the events.

    Input: state `segmenting`. The series is loaded and `gate.assess` segments it and weighs the
    evidence: the detector's newest `SeriesScore`, the ingest geometry findings, the segmenter's own
    output. `ROUTING_RULES` then decides on the facts, the gate's decision among them:

    - auto: by `settings.export_format`, the DICOM-SEG `results/<series_id>/liver-seg-<version>.dcm`
      ("seg"), the RT Structure Set `results/<series_id>/liver-rtstruct-<version>.dcm` with one ROI
      `settings.rtstruct_roi_name` ("rtstruct"), or both ("both"); an `Export` row per object (keyed
      by its SOP Instance UID, so a repeat finds it), state `exporting`, one export message per
      object to queue. No PACS configured: `export_failed`.
    - worklist: the segmenter's liver kept as a draft SEG (`draft_path`; none when the mask is
      empty), never sent and no `Export`; state `worklisted`, a `WorklistItem` whose reason is the
      decision's and whose detail holds the decision (`GateDecision.as_json`: every finding with
      its value, threshold, slices and plain words), the draft file and the model versions.
    - withheld (an off-target series with `settings.off_target_routing` "withhold"): the same
      draft and detail on the "withheld" event, state `withheld`, `Series.route` None, its reason
      in `Series.route_reason`; nothing sent, not on the worklist.

    An unreadable series: `worklisted` ("unreadable"). A readable one that the segmenter or the gate
    refuses (ValueError), or whose SEG / RT Structure Set cannot be built from its headers:
    `worklisted` ("cannot_segment") at once, the problem in words in the item's detail, nothing sent.
    With `settings.segmentation_mode` "forward"
    the series goes to the external node instead (`forward`) and neither `segmenter` nor `gate` is
    used (the worker passes None).

    Shadow mode (`settings.mode` "shadow", service/shadow.py): the auto route writes its objects (the
    SEG always, for the reviewer's viewer) but records no export and sends nothing; the series ends
    `withheld` (`withhold`). The worklist and withheld routes are the same as live.

    Returns:
        What to queue, one `Next("export", export_id)` per export; empty: nothing.

    Raises:
        ValueError: `segmenter` is None in internal mode.
    """
    if settings.segmentation_mode == "forward":
        nxt = forward(sessions=sessions, settings=settings, series_id=series_id)
        return [nxt] if nxt != DONE else []
    if segmenter is None:
        raise ValueError("segmenter is None; segmentation_mode 'internal' needs one")
    read = _read_series(sessions=sessions, settings=settings, series_id=series_id)
    if read is None:
        return []
    assessed = _assess(
        sessions=sessions,
        settings=settings,
        series_id=series_id,
        read=read,
        segmenter=segmenter,
        gate=gate or Gate.rules_only(),
        worker=worker,
    )
    if assessed is None:
        return []
    if assessed.route != Route.AUTO and assessed.reason is not None:
        _keep_draft(sessions=sessions, settings=settings, assessed=assessed, reason=assessed.reason)
        return []
    decided = {"route": Route.AUTO.value, "gate": assessed.decision.as_json(), **assessed.versions}
    written = write_auto_objects(
        sessions=sessions,
        settings=settings,
        series_id=series_id,
        headers=assessed.headers,
        mask=assessed.segmentation.mask,
        segmenter=segmenter,
        source_series_version=read.version,
        decided={"gate": decided["gate"], **assessed.versions},
    )
    if written is None:
        return []
    clock = assessed.clock
    del assessed  # the mask and the headers are the largest objects; free them before recording
    return record_auto(
        sessions=sessions,
        settings=settings,
        series_id=series_id,
        series_instance_uid=read.series_instance_uid,
        written=written,
        decided=decided,
        clock=clock,
    )


def _detector_evidence(score: SeriesScore | None) -> DetectorEvidence | None:
    """The detector's say on a series (its newest `SeriesScore`) as the gate reads it; None if never scored."""
    if score is None:
        return None
    ordered = sorted(score.slices or [], key=lambda s: int(s["index"]))
    return DetectorEvidence(
        score=float(score.score),
        threshold=float(score.threshold),
        slice_scores=tuple(float(s["score"]) for s in ordered),
        model_version=score.model_version,
    )


def _read_series(*, sessions: sessionmaker[Session], settings: Settings, series_id: int) -> _SegmentInput | None:
    """The series as the segment stage needs it; None when there is nothing to segment (gone, superseded, moved on)."""
    with sessions() as session:
        series = series_row(session, series_id)
        if series is None:
            return None
        if series.superseded or series.state != S.SEGMENTING.value:
            log.info("series id %s is %s; nothing to segment", series_id, series.state)
            return None
        return _SegmentInput(
            version=series.version,
            series_instance_uid=series.series_instance_uid,
            geometry_findings=list(series.geometry_findings or []),
            evidence=_detector_evidence(
                session.scalar(
                    select(SeriesScore)
                    .where(SeriesScore.series_id == series_id)
                    .order_by(SeriesScore.id.desc())
                    .limit(1)
                )
            ),
            paths=instance_paths(session=session, storage_dir=settings.storage_dir, series_id=series_id),
        )


def _assess(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    series_id: int,
    read: _SegmentInput,
    segmenter: Segmenter,
    gate: Gate,
    worker: str | None,
) -> _Assessed | None:
    """Load the series, let the gate segment it and decide, and route it by `ROUTING_RULES`.

    None when the series went to the worklist here: unreadable ("unreadable", event "rerouted"),
    or refused by the segmenter or the gate ("cannot_segment").
    """
    try:
        volume = load_stored_series(read.paths.values())
    except dicom_series.SeriesError as exc:
        with sessions.begin() as session:
            to_worklist(
                session=session,
                series_id=series_id,
                source=S.SEGMENTING,
                reason=RouteReason.UNREADABLE,
                detail={"problem": exc.problem},
                event="rerouted",
            )
        return None
    clock = utc_now()
    try:
        assessment = gate.assess(
            series=volume,
            segmenter=segmenter,
            detector=read.evidence,
            geometry_findings=read.geometry_findings,
            min_liver_ml=settings.min_liver_ml,
        )
    except ValueError as exc:  # the segmenter or the gate refused this series: a person contours it
        problem = f"the segmenter could not process the series ({type(exc).__name__}: {exc})"
        cannot_segment(sessions=sessions, series_id=series_id, problem=problem, detail={"worker": worker})
        return None
    result, decision = assessment.segmentation, assessment.decision
    evidence = read.evidence
    liver_found = bool(result.mask.any()) and result.liver_volume_ml >= settings.min_liver_ml
    facts = RouteFacts(
        geometry_findings=read.geometry_findings,
        flagged=evidence.score > evidence.threshold if evidence is not None else None,
        gate=decision,
        liver_found=liver_found,
        off_target_routing=settings.off_target_routing,
    )
    chosen, reason = decide_route(facts)
    return _Assessed(
        series_id=series_id,
        read=read,
        segmentation=result,
        decision=decision,
        route=chosen,
        reason=reason,
        versions={
            "gate_version": gate.version,
            "segmenter_version": segmenter.version,
            "detector_version": evidence.model_version if evidence is not None else None,
            "worker": worker,
        },
        headers=[pydicom.dcmread(read.paths[uid], stop_before_pixels=True) for uid in volume.sop_instance_uids],
        segmenter=segmenter,
        clock=clock,
    )


def _keep_draft(
    *, sessions: sessionmaker[Session], settings: Settings, assessed: _Assessed, reason: RouteReason
) -> None:
    """The worklist or withheld route: the liver kept as a draft SEG (never sent), the series moved for `reason`."""
    series_id, result = assessed.series_id, assessed.segmentation
    draft = None
    if result.mask.any():
        draft = draft_path(settings=settings, series_id=series_id, segmenter_version=assessed.segmenter.version)
        try:
            write_liver_seg(
                path=draft,
                headers=assessed.headers,
                mask=result.mask,
                segmenter=assessed.segmenter,
                source_series_version=assessed.read.version,
            )
        except ValueError as exc:  # the series still goes where the route says, without a draft
            log.warning("series id %s: no draft SEG: %s: %s", series_id, type(exc).__name__, exc)
            draft = None
    duration = (utc_now() - assessed.clock).total_seconds()
    metrics.record_stage("segment", duration)
    detail = {
        "gate": assessed.decision.as_json(),
        "draft": relative_to_storage(draft, settings.storage_dir) if draft is not None else None,
        "liver_volume_ml": round(result.liver_volume_ml, 1),
        "duration_s": round(duration, 2),
        **assessed.versions,
    }
    evidence = assessed.read.evidence
    if evidence is not None:
        detail.update(score=round(evidence.score, 4), threshold=round(evidence.threshold, 4))
    with sessions.begin() as session:
        if assessed.route == Route.WORKLIST:
            moved = to_worklist(session=session, series_id=series_id, source=S.SEGMENTING, reason=reason, detail=detail)
        else:
            moved = transition(
                session=session,
                series_id=series_id,
                source=S.SEGMENTING,
                target=S.WITHHELD,
                event="withheld",
                detail={"route": "withheld", "reason": reason.value, **detail},
                values={"route": None, "route_reason": reason.value},
            )
    if moved and assessed.route is None:
        metrics.record_route("withheld", reason.value)
    log.info(
        "series id %s: %s (%s; gate %s); draft %s",
        series_id,
        "worklisted" if assessed.route == Route.WORKLIST else "withheld",
        reason.value,
        assessed.versions["gate_version"],
        "kept" if draft is not None else "none (no liver)",
    )
