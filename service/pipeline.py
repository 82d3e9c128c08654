"""The pipeline, wired in one place: a completed series → score → segment → the gate decides → export, or worklist.

Stages (each a function below; the Celery tasks in `service.pipeline_tasks` only call them):

=========  ===========================  =================================================  ==============
stage      input (series state)         output                                             queue
=========  ===========================  =================================================  ==============
start      `queued` (ingest sent it)    `scoring`: waits for a score worker                 pipeline_queue
score      `scoring`                    `SeriesScore` (per-slice scores, top residual       score_queue
                                        maps) and `scored`; then **route** at once.
                                        Unreadable: `worklisted` ("unreadable")
route      `scored`                     `segmenting`: every readable series is segmented    (inline)
                                        and the gate decides after. Forward mode (no
                                        segmenter of ours): `ROUTING_RULES` on the
                                        detector's flag and the geometry, `segmenting` or
                                        `worklisted`
segment    `segmenting`                 the segmenter's liver and the gate's decision        segment_queue
                                        (`service.gate`, `Gate.assess`), then by
                                        `ROUTING_RULES`: auto → the liver DICOM-SEG and/or
                                        RT Structure Set under `results/` (`export_format`),
                                        an `Export` row per object, `exporting`; manual →
                                        a draft SEG under `results/` (stored, never sent),
                                        `worklisted` with the decision and its findings;
                                        off-target with `off_target_routing` "withhold" →
                                        `withheld` with its reason. Forward mode: the
                                        series C-STOREd to the external node, `delivered`
                                        or `export_failed` (`forward`)
export     `exporting`                  each object sent (the `deliver_seg` task); once all  export_queue
                                        settled: `delivered` (all delivered) or
                                        `export_failed` (any failed)
contour    a `stored` RTSTRUCT / SEG    each pending `ContourObject` of it matched to its  pipeline_queue
           series (a returned contour)  worklisted CT series, the liver rasterised, a
                                        `PoolEntry`, the CT series `contoured`; or the
                                        object kept with a status and reason
                                        (`service.contours`). Queued by `queue_contours`
=========  ===========================  =================================================  ==============

The route is decided by `ROUTING_RULES`, a table: the first rule whose condition holds on the
series' `RouteFacts` — the gate's decision among them — sends it to the worklist (or, for a
series the liver model does not apply to, withholds it) with that reason; when none holds it goes
to the PACS. Changing the route is a change of that table.

The events say which models decided: "routed" (to the worklist), "exporting", "withheld" and
"export_failed" hold the gate's decision (`GateDecision.as_json`) and the gate, segmenter and
detector versions.

Every state change goes through `service.lifecycle.transition` (the lifecycle's one owner), which
checks the declared transitions, changes the row only if it is still in the expected state (so two
workers never both move it), sets `state_changed_at` and writes a `SeriesEvent`. What to queue
next is a `service.celery_app.Next`; the tasks publish it after the stage's commit. The database is the truth: a message may be lost or
delivered twice, a worker may die mid-stage; `sweep` (run by the listener's assembler thread every
`pipeline_sweep_interval_s`) queues a stage again when its series has stayed in it longer than
`pipeline_stuck_after_s`, and `SeriesScore`'s unique (series, model version) and the SEG's
deterministic SOP Instance UID make a repeated stage harmless.

No patient data (names, ids, birth dates, accession numbers) goes into events, logs or task
arguments here: internal ids, DICOM UIDs, scores and states only.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service import contours, dicom_series, imaging, metrics
from service.celery_app import DONE, Next, Publisher
from service.db.session import rows_changed
from service.db.tables import (
    Export,
    ExportState,
    Instance,
    Route,
    RouteReason,
    Series,
    SeriesEvent,
    SeriesScore,
    WorklistItem,
    WorklistStatus,
    utc_now,
)
from service.gate import DetectorEvidence, Gate, GateDecision
from service.lifecycle import WORKING_STATES, SeriesState, transition
from service.settings import Settings
from service.shadow import SHADOW_REVIEW_QUESTION, selected_for_shadow_review

if TYPE_CHECKING:  # the heavy objects come in as arguments, built once per worker process
    from service.inference import Detector, PatchDetector
    from service.segmentation import Segmenter

log = logging.getLogger(__name__)

S = SeriesState

# --- routing, as data -------------------------------------------------------------------------------


#: Route reasons of a series the liver model does not apply to (no liver in the field of view, the
#: liver only partly covered, not an abdominal CT): `Settings.off_target_routing` says where they go.
#: Values, so that a reason the gate adds is recognised by its name.
OFF_TARGET_REASONS = frozenset({"no_liver", "liver_partial", "not_abdomen"})


@dataclass(frozen=True)
class RouteFacts:
    """What the route is decided on, for one series version.

    Attributes:
        geometry_findings: the ingest geometry check's findings (`Series.geometry_findings`).
        unreadable: why the series could not be read or scored; None when it could.
        flagged: whether the detector's series score is above its threshold; None before scoring.
        gate: the gate's decision after segmentation (`service.gate`); None without one (before
            segmentation, an unreadable series, forward mode where our segmenter does not run).
            With a decision, the gate has weighed the geometry and the detector itself: the rules
            on them apply only without one.
        liver_found: whether the segmenter found at least `min_liver_ml` of liver; None before
            segmentation. A safety net under the gate: an empty SEG is never sent.
        off_target_routing: `Settings.off_target_routing`, "worklist" or "withhold".
    """

    geometry_findings: Sequence[dict[str, Any]] = ()
    unreadable: str | None = None
    flagged: bool | None = None
    gate: GateDecision | None = None
    liver_found: bool | None = None
    off_target_routing: str = "worklist"


@dataclass(frozen=True)
class RouteRule:
    """Send a series to `route` with `reason` when `applies(facts)` holds.

    `reason` is a `RouteReason`, or a function of the facts that gives it (the gate's reason).
    `route` None: withheld — kept with its reason, nothing sent, not on the worklist.
    """

    reason: RouteReason | Callable[[RouteFacts], RouteReason | None]
    applies: Callable[[RouteFacts], bool]
    meaning: str
    route: Route | None = Route.WORKLIST


def _gate_manual(f: RouteFacts) -> bool:
    return f.gate is not None and f.gate.manual


def _gate_reason(f: RouteFacts) -> RouteReason | None:
    return f.gate.reason if f.gate is not None else None


def off_target_reason(f: RouteFacts) -> RouteReason | None:
    """Why the liver model does not apply to the series (a reason in `OFF_TARGET_REASONS`), or None.

    From the gate's reason, then its fired findings (a rule or signal named like the reason), then
    `liver_found` False ("no_liver").
    """
    names: list[str] = []
    if f.gate is not None and f.gate.manual:
        names += [f.gate.reason.value] if f.gate.reason is not None else []
        names += [finding.signal for finding in f.gate.findings if finding.fired]
    if f.liver_found is False:
        names.append(RouteReason.NO_LIVER.value)
    for name in names:
        if name in OFF_TARGET_REASONS and name in {r.value for r in RouteReason}:
            return RouteReason(name)
    return None


#: The routing decision. The first rule that applies sends the series where it says with its reason;
#: when none applies the series is auto-segmented and its SEG sent to the PACS.
ROUTING_RULES: tuple[RouteRule, ...] = (
    RouteRule(
        RouteReason.GEOMETRY,
        lambda f: f.gate is None and bool(f.geometry_findings),
        "no gate decision (unreadable, forward mode): ingest found gaps, mixed orientations, a localizer ...",
    ),
    RouteRule(
        RouteReason.UNREADABLE,
        lambda f: f.unreadable is not None,
        "the series could not be read or scored (one slice, undecodable pixels, not CT ...)",
    ),
    RouteRule(
        RouteReason.ANOMALY,
        lambda f: f.gate is None and f.flagged is True,
        "no gate decision (forward mode): the detector's series score is above the model's threshold",
    ),
    RouteRule(
        off_target_reason,
        lambda f: f.off_target_routing == "withhold" and off_target_reason(f) is not None,
        "the liver model does not apply (no liver in view, liver partly covered, not an abdominal CT) and "
        "off_target_routing is 'withhold': kept with its reason, nothing sent, not on the worklist",
        route=None,
    ),
    RouteRule(
        _gate_reason,
        _gate_manual,
        "the gate (evidence calibrated on normal series, and its rules) says a person must contour it",
    ),
    RouteRule(
        RouteReason.NO_LIVER,
        lambda f: f.liver_found is False,
        "the segmenter found no liver: nothing to deliver (never an empty SEG), a person must look",
    ),
)


def decide_route(facts: RouteFacts) -> tuple[Route | None, RouteReason | None]:
    """(route, reason) of the first rule in `ROUTING_RULES` that applies, else (Route.AUTO, None).

    route `Route.WORKLIST`: manual contouring; None: withheld (an off-target series with
    `off_target_routing` "withhold"). A gate that says manual without a reason gives "anomaly".
    """
    for rule in ROUTING_RULES:
        if rule.applies(facts):
            reason = rule.reason(facts) if callable(rule.reason) else rule.reason
            return rule.route, reason or RouteReason.ANOMALY
    return Route.AUTO, None


# --- what the stages read and write -----------------------------------------------------------------


def _series_row(session: Session, series_id: int) -> Series | None:
    series = session.get(Series, series_id)
    if series is None:
        log.warning("series id %s does not exist; message dropped", series_id)
    return series


def instance_paths(*, session: Session, storage_dir: Path, series_id: int) -> dict[str, Path]:
    """The stored file of every instance of series version `series_id`, by SOP Instance UID."""
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.relative_path).where(Instance.series_id == series_id)
    ).all()
    return {uid: storage_dir / path for uid, path in rows}


def load_stored_series(paths: Iterable[Path]) -> dicom_series.CTSeries:
    """Read one stored series version as a CT volume in HU, slices head → feet.

    Raises:
        dicom_series.SeriesError: the files are not one usable CT series; the message says why.
    """
    groups = dicom_series.group_files(paths)
    if len(groups) != 1:
        uid = groups[0].series_instance_uid if groups else "(none)"
        raise dicom_series.SeriesError(uid, f"{len(groups)} series among the stored files; expected 1")
    return dicom_series.load_series(groups[0])


def results_dir(*, settings: Settings, series_id: int) -> Path:
    """The folder of a series version's pipeline results (residual maps, SEG) under `storage_dir`."""
    return settings.storage_dir / "results" / str(series_id)


def _relative(path: Path, storage_dir: Path) -> str:
    return path.resolve().relative_to(storage_dir.resolve()).as_posix()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def save_top_residual_maps(
    *,
    settings: Settings,
    series_id: int,
    model_version: str,
    slices: Sequence[dict[str, Any]],
    residual_maps: np.ndarray | None,
) -> list[dict[str, Any]]:
    """Store the residual maps of the `settings.top_slices` highest-scoring slices; return `top_slices`.

    Each map (|x − G(E(x))| inside the body, detector resolution) is downsampled to
    `residual_map_size`² and saved as float16 `.npy` under `results/<series_id>/<model_version>/`.
    Each entry is `{"index", "score", "residual_map", "sop_instance_uid"}`, `residual_map` relative
    to `storage_dir` (None when the detector gave no maps); highest score first.
    """
    order = sorted(range(len(slices)), key=lambda i: slices[i]["score"], reverse=True)[: settings.top_slices]
    folder = results_dir(settings=settings, series_id=series_id) / model_version
    size = settings.residual_map_size
    top = []
    for i in order:
        relative = None
        if residual_maps is not None:
            small = imaging.resize(np.asarray(residual_maps[i], np.float32), (size, size)).astype(np.float16)
            path = folder / f"residual_{i:04d}.npy"
            _atomic_write(path, partial(_save_npy, array=small))
            relative = _relative(path, settings.storage_dir)
        top.append(
            {
                "index": i,
                "score": slices[i]["score"],
                "residual_map": relative,
                "sop_instance_uid": slices[i]["sop_instance_uid"],
            }
        )
    return top


def _to_worklist(
    *,
    session: Session,
    series_id: int,
    source: SeriesState | Iterable[SeriesState],
    reason: RouteReason,
    detail: dict[str, Any],
    event: str = "routed",
) -> bool:
    """Move the series to `worklisted` with a `WorklistItem` (one per series version) for `reason`."""
    moved = transition(
        session=session,
        series_id=series_id,
        source=source,
        target=S.WORKLISTED,
        event=event,
        detail={"route": Route.WORKLIST.value, "reason": reason.value, **detail},
        values={"route": Route.WORKLIST.value, "route_reason": reason.value},
    )
    if moved and session.scalar(select(WorklistItem.id).where(WorklistItem.series_id == series_id)) is None:
        session.add(
            WorklistItem(series_id=series_id, reason=reason.value, detail=detail, status=WorklistStatus.OPEN.value)
        )
    if moved:
        metrics.record_route(Route.WORKLIST.value, reason.value)
    return moved


# --- stage: start -----------------------------------------------------------------------------------


def start(*, sessions: sessionmaker[Session], series_id: int, worker: str) -> Next:
    """Stage *start*: a worker took series version `series_id` from the ingest queue.

    Input: state `queued` (or `complete`). Output: state `scoring`, and the score stage to queue. A duplicate
    message (any other state, or superseded) changes nothing and queues nothing.
    """
    with sessions.begin() as session:
        # From `complete` too: the worker took the message before the publisher recorded it (`ingest.queue`).
        moved = transition(
            session=session,
            series_id=series_id,
            source=(S.COMPLETE, S.QUEUED),
            target=S.SCORING,
            detail={"worker": worker},
        )
    if not moved:
        log.info("series id %s is not queued (duplicate message or superseded); nothing to do", series_id)
        return DONE
    log.info("series id %s: scoring", series_id)
    return Next("score", series_id)


# --- stage: score (then route) ----------------------------------------------------------------------


def score(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    series_id: int,
    detector: Detector | PatchDetector,
    worker: str | None = None,
) -> Next:
    """Stage *score*: run the detector over every slice of the series, store the result, then route.

    `worker` (the worker's node name) is recorded in the "scored" event.

    Input: state `scoring` (or `scored`, when a worker died before routing). Output: a
    `SeriesScore` for (series, `detector.version`) — per-slice scores in volume order and the top
    slices' residual maps — state `scored`, then the route (see `route`). Unreadable series go
    straight to the worklist ("unreadable"). Already scored by this model version: not scored again.

    Raises:
        Anything the detector raises unexpectedly (ONNX Runtime); the series stays in `scoring`
        and the sweeper queues it again after `pipeline_stuck_after_s`.
    """
    with sessions() as session:
        series = _series_row(session, series_id)
        if series is None:
            return DONE
        if series.superseded or series.state not in (S.SCORING.value, S.SCORED.value):
            log.info("series id %s is %s; nothing to score", series_id, series.state)
            return DONE
        state = SeriesState(series.state)
        findings = list(series.geometry_findings or [])
        existing = session.scalar(
            select(SeriesScore).where(SeriesScore.series_id == series_id, SeriesScore.model_version == detector.version)
        )
        paths = instance_paths(session=session, storage_dir=settings.storage_dir, series_id=series_id)

    if state == S.SCORING and existing is None:
        clock = utc_now()
        try:
            volume = load_stored_series(paths.values())
        except dicom_series.SeriesError as exc:
            log.warning("series id %s is unreadable: %s", series_id, exc.problem)
            facts = RouteFacts(geometry_findings=findings, unreadable=exc.problem)
            _, reason = decide_route(facts)
            with sessions.begin() as session:
                _to_worklist(
                    session=session,
                    series_id=series_id,
                    source=S.SCORING,
                    reason=reason or RouteReason.UNREADABLE,
                    detail={"problem": exc.problem, "model_version": detector.version},
                )
            return DONE
        result = detector.score_series(volume, keep_maps=True)
        del volume  # the HU volume is the largest object; free it before writing results
        slices = [
            {
                "index": i,
                "sop_instance_uid": s.sop_instance_uid,
                "position": round(s.position, 5),
                "score": round(s.score, 6),
            }
            for i, s in enumerate(result.slices)
        ]
        top = save_top_residual_maps(
            settings=settings,
            series_id=series_id,
            model_version=detector.version,
            slices=slices,
            residual_maps=result.residual_maps,
        )
        duration = (utc_now() - clock).total_seconds()
        try:
            with sessions() as session:
                session.add(
                    SeriesScore(
                        series_id=series_id,
                        model_version=detector.version,
                        score=float(result.score),
                        threshold=float(result.threshold),
                        flagged=bool(result.flagged),
                        slices=slices,
                        top_slices=top,
                        provider=detector.provider,
                        duration_s=round(duration, 3),
                    )
                )
                session.flush()
                moved = transition(
                    session=session,
                    series_id=series_id,
                    source=S.SCORING,
                    target=S.SCORED,
                    detail={
                        "model_version": detector.version,
                        "score": round(result.score, 4),
                        "threshold": round(result.threshold, 4),
                        "flagged": result.flagged,
                        "slices": len(slices),
                        "duration_s": round(duration, 2),
                        "worker": worker,
                    },
                )
                if not moved:  # another worker scored and moved it meanwhile: keep its result
                    session.rollback()
                    return DONE
                session.commit()
        except IntegrityError:
            log.info("series id %s was scored by another worker meanwhile", series_id)
            return DONE
        metrics.record_stage("score", duration)
        log.info(
            "series id %s scored %.3f (threshold %.3f, %s) in %.1f s, %d slices",
            series_id,
            result.score,
            result.threshold,
            "flagged" if result.flagged else "not flagged",
            duration,
            len(slices),
        )
    elif state == S.SCORING:  # scored before by this model version (a redelivery after a crash)
        with sessions.begin() as session:
            transition(
                session=session,
                series_id=series_id,
                source=S.SCORING,
                target=S.SCORED,
                detail={"model_version": detector.version, "reused": True},
            )
    return route(sessions=sessions, settings=settings, series_id=series_id, model_version=detector.version)


def route(*, sessions: sessionmaker[Session], settings: Settings, series_id: int, model_version: str) -> Next:
    """Stage *route*: where a scored series goes next.

    Input: state `scored` with a `SeriesScore` of `model_version`. Output, internal mode: `segmenting`
    and the segment stage to queue — every readable series is segmented, and the gate decides its
    route after (`segment`). Forward mode (`segmentation_mode` "forward", our segmenter does not
    run): by `ROUTING_RULES` on the geometry and the detector's flag, `segmenting` (the forward
    stage) or `worklisted` with a `WorklistItem`, one "routed" event.
    """
    with sessions.begin() as session:
        series = _series_row(session, series_id)
        if series is None or series.state != S.SCORED.value:
            return DONE
        result = session.scalar(
            select(SeriesScore).where(SeriesScore.series_id == series_id, SeriesScore.model_version == model_version)
        )
        if result is None:
            log.error("series id %s is scored but has no score of model %s", series_id, model_version)
            return DONE
        summary = {
            "score": round(result.score, 4),
            "threshold": round(result.threshold, 4),
            "model_version": model_version,
            "detector_version": model_version,
        }
        if settings.segmentation_mode == "internal":
            moved = transition(
                session=session, series_id=series_id, source=S.SCORED, target=S.SEGMENTING, detail=summary
            )
            if moved:
                log.info("series id %s: segmenting (the gate decides after)", series_id)
            return Next("segment", series_id) if moved else DONE
        facts = RouteFacts(geometry_findings=list(series.geometry_findings or []), flagged=result.flagged)
        chosen, reason = decide_route(facts)
        if chosen == Route.WORKLIST and reason is not None:
            detail = dict(summary)
            if reason == RouteReason.GEOMETRY:
                detail["findings"] = [f.get("code") for f in facts.geometry_findings]
            moved = _to_worklist(session=session, series_id=series_id, source=S.SCORED, reason=reason, detail=detail)
            nxt = DONE
        else:
            chosen = Route.AUTO
            moved = transition(
                session=session,
                series_id=series_id,
                source=S.SCORED,
                target=S.SEGMENTING,
                event="routed",
                detail={"route": Route.AUTO.value, **summary},
                values={"route": Route.AUTO.value, "route_reason": None},
            )
            nxt = Next("segment", series_id)
    if not moved:
        return DONE
    if chosen == Route.AUTO:
        metrics.record_route(chosen.value, None)
    log.info("series id %s routed to %s%s", series_id, chosen.value, f" ({reason.value})" if reason else "")
    return nxt


# --- stage: segment ---------------------------------------------------------------------------------


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


def _write_seg(
    *, path: Path, headers: Sequence[Any], mask: np.ndarray, segmenter: Segmenter, source_series_version: int
) -> None:
    from service.dicom_seg import build_liver_seg

    seg = build_liver_seg(
        source_images=headers,
        mask=mask,
        algorithm_name=segmenter.name[:64],
        algorithm_version=segmenter.version[:64],
        source_series_version=source_series_version,
    )
    _atomic_write(path, lambda tmp: seg.save_as(tmp, enforce_file_format=True))


def draft_path(*, settings: Settings, series_id: int, segmenter_version: str) -> Path:
    """Where the draft SEG of a series the gate did not let through lies: stored, never sent.

    `results/<series_id>/liver-seg-draft-<segmenter version>.dcm`, where the series page's viewer
    finds a contour (`liver-seg-*.dcm`).
    """
    return results_dir(settings=settings, series_id=series_id) / f"liver-seg-draft-{segmenter_version}.dcm"


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
    import pydicom

    from service.dicom_rtstruct import build_liver_rtstruct
    from service.dicom_send import ExportNotConfiguredError
    from service.pacs_export import record_export

    if settings.segmentation_mode == "forward":
        nxt = forward(sessions=sessions, settings=settings, series_id=series_id)
        return [nxt] if nxt != DONE else []
    if segmenter is None:
        raise ValueError("segmenter is None; segmentation_mode 'internal' needs one")
    gate = gate or Gate.rules_only()
    with sessions() as session:
        series = _series_row(session, series_id)
        if series is None:
            return []
        if series.superseded or series.state != S.SEGMENTING.value:
            log.info("series id %s is %s; nothing to segment", series_id, series.state)
            return []
        version = series.version
        series_instance_uid = series.series_instance_uid
        geometry_findings = list(series.geometry_findings or [])
        evidence = _detector_evidence(
            session.scalar(
                select(SeriesScore).where(SeriesScore.series_id == series_id).order_by(SeriesScore.id.desc()).limit(1)
            )
        )
        paths = instance_paths(session=session, storage_dir=settings.storage_dir, series_id=series_id)
    try:
        volume = load_stored_series(paths.values())
    except dicom_series.SeriesError as exc:
        with sessions.begin() as session:
            _to_worklist(
                session=session,
                series_id=series_id,
                source=S.SEGMENTING,
                reason=RouteReason.UNREADABLE,
                detail={"problem": exc.problem},
                event="rerouted",
            )
        return []
    clock = utc_now()
    try:
        assessment = gate.assess(
            series=volume,
            segmenter=segmenter,
            detector=evidence,
            geometry_findings=geometry_findings,
            min_liver_ml=settings.min_liver_ml,
        )
    except ValueError as exc:  # the segmenter or the gate refused this series: a person contours it
        problem = f"the segmenter could not process the series ({type(exc).__name__}: {exc})"
        _cannot_segment(sessions=sessions, series_id=series_id, problem=problem, detail={"worker": worker})
        return []
    result, decision = assessment.segmentation, assessment.decision
    liver_found = bool(result.mask.any()) and result.liver_volume_ml >= settings.min_liver_ml
    facts = RouteFacts(
        geometry_findings=geometry_findings,
        flagged=evidence.score > evidence.threshold if evidence is not None else None,
        gate=decision,
        liver_found=liver_found,
        off_target_routing=settings.off_target_routing,
    )
    chosen, reason = decide_route(facts)
    versions = {
        "gate_version": gate.version,
        "segmenter_version": segmenter.version,
        "detector_version": evidence.model_version if evidence is not None else None,
        "worker": worker,
    }
    headers = [pydicom.dcmread(paths[uid], stop_before_pixels=True) for uid in volume.sop_instance_uids]
    folder = results_dir(settings=settings, series_id=series_id)

    if chosen != Route.AUTO and reason is not None:
        draft = None
        if result.mask.any():
            draft = draft_path(settings=settings, series_id=series_id, segmenter_version=segmenter.version)
            try:
                _write_seg(
                    path=draft, headers=headers, mask=result.mask, segmenter=segmenter, source_series_version=version
                )
            except ValueError as exc:  # the series still goes where the route says, without a draft
                log.warning("series id %s: no draft SEG: %s: %s", series_id, type(exc).__name__, exc)
                draft = None
        duration = (utc_now() - clock).total_seconds()
        metrics.record_stage("segment", duration)
        detail = {
            "gate": decision.as_json(),
            "draft": _relative(draft, settings.storage_dir) if draft is not None else None,
            "liver_volume_ml": round(result.liver_volume_ml, 1),
            "duration_s": round(duration, 2),
            **versions,
        }
        if evidence is not None:
            detail.update(score=round(evidence.score, 4), threshold=round(evidence.threshold, 4))
        with sessions.begin() as session:
            if chosen == Route.WORKLIST:
                moved = _to_worklist(
                    session=session, series_id=series_id, source=S.SEGMENTING, reason=reason, detail=detail
                )
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
        if moved and chosen is None:
            metrics.record_route("withheld", reason.value)
        log.info(
            "series id %s: %s (%s; gate %s); draft %s",
            series_id,
            "worklisted" if chosen == Route.WORKLIST else "withheld",
            reason.value,
            gate.version,
            "kept" if draft is not None else "none (no liver)",
        )
        return []

    written: list[Path] = []
    making = "SEG"
    try:
        if settings.export_format in ("seg", "both") or settings.mode == "shadow":
            written.append(folder / f"liver-seg-{segmenter.version}.dcm")
            _write_seg(
                path=written[-1], headers=headers, mask=result.mask, segmenter=segmenter, source_series_version=version
            )
        if settings.export_format in ("rtstruct", "both"):
            making = "RT Structure Set"
            rtstruct = build_liver_rtstruct(
                source_images=headers,
                mask=result.mask,
                algorithm_name=segmenter.name[:64],
                algorithm_version=segmenter.version[:64],
                source_series_version=version,
                roi_name=settings.rtstruct_roi_name,
            )
            written.append(folder / f"liver-rtstruct-{segmenter.version}.dcm")
            _atomic_write(written[-1], lambda tmp: rtstruct.save_as(tmp, enforce_file_format=True))
    except ValueError as exc:  # the headers do not make a valid object: nothing is sent, a person contours it
        problem = f"the liver {making} could not be built from the series' headers"
        _cannot_segment(
            sessions=sessions,
            series_id=series_id,
            problem=f"{problem} ({type(exc).__name__}: {exc})",
            detail={"gate": decision.as_json(), **versions},
        )
        return []
    del volume, result, headers, assessment
    duration = (utc_now() - clock).total_seconds()
    metrics.record_stage("segment", duration)
    files = [_relative(path, settings.storage_dir) for path in written]
    decided = {"route": Route.AUTO.value, "gate": decision.as_json(), **versions}
    if settings.mode == "shadow":
        withhold(
            sessions=sessions,
            settings=settings,
            series_id=series_id,
            series_instance_uid=series_instance_uid,
            review=True,
            detail={"files": files, "duration_s": round(duration, 2), **decided},
        )
        return []
    auto = {"route": Route.AUTO.value, "route_reason": None}
    try:
        recorded = [
            record_export(sessions=sessions, settings=settings, path=path, series_id=series_id) for path in written
        ]
    except ExportNotConfiguredError as exc:
        log.error("series id %s: %s written but not sent: %s", series_id, settings.export_format.upper(), exc)
        with sessions.begin() as session:
            transition(
                session=session,
                series_id=series_id,
                source=S.SEGMENTING,
                target=S.EXPORT_FAILED,
                detail={"reason": str(exc), "files": files, **decided},
                values=auto,
            )
        return []
    with sessions.begin() as session:
        moved = transition(
            session=session,
            series_id=series_id,
            source=S.SEGMENTING,
            target=S.EXPORTING,
            detail={
                "export_ids": [export_id for export_id, _ in recorded],
                "files": files,
                "duration_s": round(duration, 2),
                **decided,
            },
            values=auto,
        )
    if moved:
        metrics.record_route(Route.AUTO.value, None)
    log.info(
        "series id %s segmented in %.1f s, auto (gate %s); exports %s %s",
        series_id,
        duration,
        gate.version,
        ", ".join(str(export_id) for export_id, _ in recorded),
        "recorded" if any(created for _, created in recorded) else "already recorded",
    )
    # The series moved, or a repeat recorded an export a crash left out: queue each new one (a
    # message for an export already sent or settled does nothing).
    return [Next("export", export_id) for export_id, created in recorded if moved or created]


def _cannot_segment(*, sessions: sessionmaker[Session], series_id: int, problem: str, detail: dict[str, Any]) -> None:
    """A readable series that cannot be segmented or exported: to the worklist ("cannot_segment") at once.

    Never raised out of the stage: a retry would meet the same series and end, after the sweeper's
    attempts, as "unreadable" without the reason.
    """
    log.warning("series id %s: %s", series_id, problem)
    with sessions.begin() as session:
        _to_worklist(
            session=session,
            series_id=series_id,
            source=S.SEGMENTING,
            reason=RouteReason.CANNOT_SEGMENT,
            detail={"problem": problem, **detail},
        )


# --- shadow mode (service/shadow.py) ----------------------------------------------------------------


def withhold(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    series_id: int,
    series_instance_uid: str,
    review: bool,
    detail: dict[str, Any],
) -> bool:
    """Shadow mode's end of the auto route: `segmenting` → `withheld` (`Series.route` auto), nothing sent.

    With `review`, and when `service.shadow.selected_for_shadow_review` chooses the series (a
    share `settings.shadow_review_share`), it also gets an open worklist item of reason
    "shadow_review" in the same transaction, on which a dosimetrist answers whether the auto
    contour is acceptable. The "withheld" event's `detail` says whether. False when the series was
    no longer `segmenting` (a duplicate message): nothing changed.
    """
    chosen = review and selected_for_shadow_review(series_instance_uid, settings.shadow_review_share)
    with sessions.begin() as session:
        moved = transition(
            session=session,
            series_id=series_id,
            source=S.SEGMENTING,
            target=S.WITHHELD,
            event="withheld",
            detail={**detail, "mode": "shadow", "shadow_review": chosen},
            values={"route": Route.AUTO.value, "route_reason": None},
        )
        if (
            moved
            and chosen
            and session.scalar(select(WorklistItem.id).where(WorklistItem.series_id == series_id)) is None
        ):
            session.add(
                WorklistItem(
                    series_id=series_id,
                    reason=RouteReason.SHADOW_REVIEW.value,
                    detail={"question": SHADOW_REVIEW_QUESTION, "segmenter_version": detail.get("segmenter_version")},
                    status=WorklistStatus.OPEN.value,
                )
            )
    if moved:
        metrics.record_route(Route.AUTO.value, None)
        log.info(
            "series id %s withheld (shadow mode)%s",
            series_id,
            "; on the worklist for a shadow review" if chosen else "",
        )
    return moved


def forward(*, sessions: sessionmaker[Session], settings: Settings, series_id: int) -> Next:
    """Stage *segment* in forward mode: send the series to the external auto-segmentation node.

    Input: state `segmenting`. Every stored instance of the series version is sent by C-STORE over
    one association to `forward_ae_title` at `forward_host`:`forward_port`
    (`service.pacs_export.send_files`); the node segments and delivers its results itself. Output:

    - every instance stored (warnings included): `delivered`, event "forwarded" with the
      destination and the number of instances;
    - a permanent failure (e.g. the node does not know our AE title, 0xA9xx): `export_failed`
      with the reason;
    - a transient failure (node down or busy, timeout, 0xA7xx): nothing changes but a
      "forward_failed" event. Retried by the sweeper, as every stage is: it queues the stage again
      after `pipeline_stuck_after_s`, and after `pipeline_max_requeues` re-queues sends the
      series to the worklist (event "gave_up") so that a person segments it. No Celery retry.

    Shadow mode: nothing is sent; the series ends `withheld` (no shadow review: there is no
    contour to review). No stored instances: `worklisted` ("unreadable"). There is no `Export` row, so `gatekeeper
    exports retry` does not apply. A repeat after a crash sends the instances again with their
    own SOP Instance UIDs, which a DICOM node stores as the same objects.
    """
    from service.dicom_send import Outcome, forward_destination, send_files

    with sessions() as session:
        series = _series_row(session, series_id)
        if series is None:
            return DONE
        if series.superseded or series.state != S.SEGMENTING.value:
            log.info("series id %s is %s; nothing to forward", series_id, series.state)
            return DONE
        series_instance_uid = series.series_instance_uid
        paths = sorted(instance_paths(session=session, storage_dir=settings.storage_dir, series_id=series_id).values())
    if not paths:
        with sessions.begin() as session:
            _to_worklist(
                session=session,
                series_id=series_id,
                source=S.SEGMENTING,
                reason=RouteReason.UNREADABLE,
                detail={"problem": "no stored instances"},
                event="rerouted",
            )
        return DONE
    if settings.mode == "shadow":
        withhold(
            sessions=sessions,
            settings=settings,
            series_id=series_id,
            series_instance_uid=series_instance_uid,
            review=False,  # no contour to review: the external node never saw the series
            detail={"forward": "not sent", "instances": len(paths)},
        )
        return DONE
    destination = forward_destination(settings)
    result = send_files(paths=paths, destination=destination, settings=settings)
    metrics.record_stage("forward", result.duration_s)
    detail = {"destination": result.destination, "instances": len(paths), "duration_s": result.duration_s}
    with sessions.begin() as session:
        if result.outcome == Outcome.DELIVERED:
            moved = transition(
                session=session,
                series_id=series_id,
                source=S.SEGMENTING,
                target=S.DELIVERED,
                event="forwarded",
                detail={**detail, "reason": result.reason},
            )
        elif result.outcome == Outcome.PERMANENT:
            moved = transition(
                session=session,
                series_id=series_id,
                source=S.SEGMENTING,
                target=S.EXPORT_FAILED,
                detail={**detail, "reason": result.reason},
            )
        else:
            moved = False
            session.add(
                SeriesEvent(
                    series_id=series_id,
                    kind="forward_failed",
                    created_at=utc_now(),
                    detail={**detail, "reason": result.reason},
                )
            )
    if result.outcome == Outcome.TRANSIENT:
        log.warning(
            "series id %s: forward to %s failed, the sweeper will retry: %s", series_id, destination, result.reason
        )
    elif moved and result.outcome == Outcome.DELIVERED:
        log.info("series id %s: %d instances forwarded to %s", series_id, len(paths), destination)
    elif moved:
        log.error("series id %s: forward to %s failed for good: %s", series_id, destination, result.reason)
    return DONE


# --- stage: export settled --------------------------------------------------------------------------


def export_settled(*, sessions: sessionmaker[Session], export_id: int, worker: str | None = None) -> None:
    """Stage *export*, last step: the series of export `export_id` follows the final state of its exports.

    `worker`: the node name of the worker that settled the export (None: the sweeper), for the event.

    A series may have several exports (`export_format` "both": the SEG and the RT Structure Set).
    Input: state `exporting` (or `export_failed`, after an operator's retry). Output: `delivered`
    when the PACS took every one of them; `export_failed` when every one has settled and any failed
    for good. While any is pending: nothing (the last one to settle moves the series).
    """
    with sessions.begin() as session:
        export = session.get(Export, export_id)
        if export is None or export.series_id is None:
            return
        series_id = export.series_id
        exports = session.execute(
            select(Export.id, Export.state, Export.last_status, Export.last_reason)
            .where(Export.series_id == series_id)
            .order_by(Export.id)
        ).all()
        states = {state for _, state, _, _ in exports}
        sources: tuple[SeriesState, ...]
        if states == {ExportState.DELIVERED.value}:
            target, sources = S.DELIVERED, (S.EXPORTING, S.EXPORT_FAILED)
        elif ExportState.PENDING.value not in states:
            target, sources = S.EXPORT_FAILED, (S.EXPORTING,)
        else:
            return
        moved = transition(
            session=session,
            series_id=series_id,
            source=sources,
            target=target,
            detail={
                "exports": [
                    {"export_id": eid, "state": state, "status": status, "reason": reason}
                    for eid, state, status, reason in exports
                ],
                "worker": worker,
            },
        )
    if moved:
        log.info("series id %s: %s (exports %s)", series_id, target.value, ", ".join(str(e[0]) for e in exports))


# --- stage: contour (returned contours) -------------------------------------------------------------


def queue_contours(
    *, sessions: sessionmaker[Session], settings: Settings, publisher: Publisher, now: dt.datetime | None = None
) -> list[int]:
    """Queue the contour stage for returned contours: run by the listener's assembler every round.

    Every contour instance of a `stored` series gets a pending `ContourObject`
    (`contours.register_received_contours`); each series with pending objects never sent, or sent
    longer than `queue_resend_after_s` ago, is claimed and its stage published. A refused
    publication gives the claim back. Returns the contour series ids published.
    """
    now = now or utc_now()
    contours.register_received_contours(sessions=sessions)
    resend_before = now - dt.timedelta(seconds=settings.queue_resend_after_s)
    published = []
    for series_id in contours.claim_due_contour_series(sessions=sessions, resend_before=resend_before, now=now):
        try:
            publisher.publish(Next("contour", series_id))
        except Exception:  # broker away: give the claim back; the next round tries again
            log.warning("could not queue the contour stage of series id %s", series_id, exc_info=True)
            contours.release_contour_claim(sessions=sessions, series_id=series_id, claimed_at=now)
            break
        published.append(series_id)
    return published


def match_contours(*, sessions: sessionmaker[Session], settings: Settings, series_id: int) -> Next:
    """Stage *contour*: match the returned contour objects of stored series `series_id` (`service.contours`).

    Input: a `stored` RTSTRUCT or SEG series with pending `ContourObject`s. Output: each object
    `matched` (a `PoolEntry`, its CT series and worklist item `contoured`), `superseded`, or kept
    with the reason it cannot be used. A duplicate message finds nothing pending and does nothing.
    """
    clock = utc_now()
    statuses = contours.process_contour_series(sessions=sessions, settings=settings, series_id=series_id)
    if statuses:
        log.info(
            "series id %s: %d contour object(s) in %.1f s: %s",
            series_id,
            len(statuses),
            (utc_now() - clock).total_seconds(),
            ", ".join(s.value for s in statuses),
        )
    return DONE


# --- the sweeper ------------------------------------------------------------------------------------


#: The stage a stuck series is queued to again, by state.
STAGE_OF_STATE = {S.SCORING: "score", S.SCORED: "score", S.SEGMENTING: "segment"}


@dataclass
class SweepReport:
    """What one sweeper round did (ids only)."""

    requeued: list[int] = field(default_factory=list)
    gave_up: list[int] = field(default_factory=list)
    settled: list[int] = field(default_factory=list)
    exports_resent: list[int] = field(default_factory=list)


def sweep(
    *, sessions: sessionmaker[Session], settings: Settings, publisher: Publisher, now: dt.datetime | None = None
) -> SweepReport:
    """One round of the pipeline's sweeper.

    - A series in `scoring`, `scored` or `segmenting` for longer than `pipeline_stuck_after_s`
      (its worker died, its message was lost) is queued to its stage again, with a "requeued"
      event; after `pipeline_max_requeues` re-queues of one stage it goes to the worklist as
      "unreadable" instead (a series that kills every worker must not loop).
    - A series in `exporting` (or `export_failed`) whose export has settled follows it.
    - Pending exports overdue by more than `queue_resend_after_s` are queued again
      (`service.pacs_export.due_exports`; a message for an export not due does nothing).
    """
    from service.pacs_export import due_exports

    now = now or utc_now()
    report = SweepReport()
    stuck_before = now - dt.timedelta(seconds=settings.pipeline_stuck_after_s)
    with sessions() as session:
        stuck = session.execute(
            select(Series.id, Series.state, Series.state_changed_at)
            .where(
                Series.state.in_([s.value for s in WORKING_STATES]),
                Series.superseded.is_(False),
                Series.state_changed_at < stuck_before,
            )
            .order_by(Series.id)
        ).all()
        settling = (
            session.execute(
                select(Export.id)
                .join(Series, Series.id == Export.series_id)
                .where(
                    Series.state.in_([S.EXPORTING.value, S.EXPORT_FAILED.value]),
                    Export.state.in_([ExportState.DELIVERED.value, ExportState.FAILED.value]),
                )
            )
            .scalars()
            .all()
        )
    for series_id, state_value, changed_at in stuck:
        state = SeriesState(state_value)
        kind = f"requeued_{state.value}"
        with sessions.begin() as session:
            # Claim: only the sweeper that moves state_changed_at first re-queues (two listeners at once).
            claimed = rows_changed(
                session.execute(
                    update(Series)
                    .where(Series.id == series_id, Series.state == state.value, Series.state_changed_at == changed_at)
                    .values(state_changed_at=now)
                    .execution_options(synchronize_session=False)
                )
            )
            if not claimed:
                continue
            attempts = (
                session.scalar(
                    select(func.count())
                    .select_from(SeriesEvent)
                    .where(SeriesEvent.series_id == series_id, SeriesEvent.kind == kind)
                )
                or 0
            )
            if attempts >= settings.pipeline_max_requeues:
                problem = f"stuck in {state.value} after {attempts} re-queues (the stage fails or its worker dies)"
                _to_worklist(
                    session=session,
                    series_id=series_id,
                    source=state,
                    reason=RouteReason.UNREADABLE,
                    detail={"problem": problem},
                    event="gave_up",
                )
                report.gave_up.append(series_id)
                log.error("series id %s: %s; sent to the worklist", series_id, problem)
                continue
            session.add(SeriesEvent(series_id=series_id, kind=kind, detail={"attempt": attempts + 1}, created_at=now))
        try:
            publisher.publish(Next(STAGE_OF_STATE[state], series_id))
        except Exception:  # broker away: the next round finds it stuck again
            log.warning("could not re-queue series id %s", series_id, exc_info=True)
            continue
        log.warning("series id %s stuck in %s; queued again (attempt %s)", series_id, state.value, attempts + 1)
        report.requeued.append(series_id)
    for export_id in settling:
        export_settled(sessions=sessions, export_id=export_id)
        report.settled.append(export_id)
    for export_id in due_exports(sessions=sessions, overdue_s=settings.queue_resend_after_s, now=now):
        try:
            publisher.publish(Next("export", export_id))
        except Exception:
            log.warning("could not re-queue export %s", export_id, exc_info=True)
            break
        report.exports_resent.append(export_id)
    return report
