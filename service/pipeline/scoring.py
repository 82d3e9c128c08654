"""Stage *score*: the detector over every slice of a series, its `SeriesScore` stored, then the route.

Steps, in order: `_read_series` (the series row and its files, in one read), `_score_new` (load the
volume, run the detector, keep the top residual maps), `_store_score` (the `SeriesScore` and the
move to `scored`, one transaction), then `service.pipeline.routing.route`.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service import dicom_series, metrics
from service.celery_app import DONE, Next
from service.db.tables import RouteReason, SeriesScore, utc_now
from service.lifecycle import SeriesState, transition
from service.pipeline.routing import RouteFacts, decide_route, route
from service.pipeline.store import (
    instance_paths,
    load_stored_series,
    save_top_residual_maps,
    series_row,
    to_worklist,
)
from service.settings import Settings

if TYPE_CHECKING:  # the heavy objects come in as arguments, built once per worker process
    from service.inference import Detector, DetectorVerdict, PatchDetector

log = logging.getLogger(__name__)

S = SeriesState


@dataclass(frozen=True)
class _ScoreInput:
    """What the score stage reads of series version `series_id` before it works.

    Attributes:
        state: `scoring` or `scored`.
        geometry_findings: the ingest geometry check's findings.
        scored_before: whether a `SeriesScore` of this detector version exists (a redelivery).
        paths: the stored file of every instance, by SOP Instance UID.
    """

    state: SeriesState
    geometry_findings: list[dict[str, Any]]
    scored_before: bool
    paths: dict[str, Path]


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
    read = _read_series(sessions=sessions, settings=settings, series_id=series_id, model_version=detector.version)
    if read is None:
        return DONE
    if read.state == S.SCORING and not read.scored_before:
        if not _score_new(
            sessions=sessions, settings=settings, series_id=series_id, read=read, detector=detector, worker=worker
        ):
            return DONE
    elif read.state == S.SCORING:  # scored before by this model version (a redelivery after a crash)
        with sessions.begin() as session:
            transition(
                session=session,
                series_id=series_id,
                source=S.SCORING,
                target=S.SCORED,
                detail={"model_version": detector.version, "reused": True},
            )
    return route(sessions=sessions, settings=settings, series_id=series_id, model_version=detector.version)


def _read_series(
    *, sessions: sessionmaker[Session], settings: Settings, series_id: int, model_version: str
) -> _ScoreInput | None:
    """The series as the score stage needs it; None when there is nothing to score (gone, superseded, moved on)."""
    with sessions() as session:
        series = series_row(session, series_id)
        if series is None:
            return None
        if series.superseded or series.state not in (S.SCORING.value, S.SCORED.value):
            log.info("series id %s is %s; nothing to score", series_id, series.state)
            return None
        existing = session.scalar(
            select(SeriesScore).where(SeriesScore.series_id == series_id, SeriesScore.model_version == model_version)
        )
        return _ScoreInput(
            state=SeriesState(series.state),
            geometry_findings=list(series.geometry_findings or []),
            scored_before=existing is not None,
            paths=instance_paths(session=session, storage_dir=settings.storage_dir, series_id=series_id),
        )


def _score_new(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    series_id: int,
    read: _ScoreInput,
    detector: Detector | PatchDetector,
    worker: str | None,
) -> bool:
    """Score a series this detector version has not scored: True when it is now `scored` (route it next).

    An unreadable series goes to the worklist ("unreadable" unless the rules say otherwise): False.
    Another worker that scored it meanwhile keeps its result: False.
    """
    clock = utc_now()
    try:
        volume = load_stored_series(read.paths.values())
    except dicom_series.SeriesError as exc:
        log.warning("series id %s is unreadable: %s", series_id, exc.problem)
        facts = RouteFacts(geometry_findings=read.geometry_findings, unreadable=exc.problem)
        _, reason = decide_route(facts)
        with sessions.begin() as session:
            to_worklist(
                session=session,
                series_id=series_id,
                source=S.SCORING,
                reason=reason or RouteReason.UNREADABLE,
                detail={"problem": exc.problem, "model_version": detector.version},
            )
        return False
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
    return _store_score(
        sessions=sessions,
        series_id=series_id,
        detector=detector,
        result=result,
        slices=slices,
        top=top,
        clock=clock,
        worker=worker,
    )


def _store_score(
    *,
    sessions: sessionmaker[Session],
    series_id: int,
    detector: Detector | PatchDetector,
    result: DetectorVerdict,
    slices: list[dict[str, Any]],
    top: list[dict[str, Any]],
    clock: dt.datetime,
    worker: str | None,
) -> bool:
    """The `SeriesScore` and the move `scoring` → `scored`, in one transaction: True when this worker did both.

    Another worker that scored and moved the series meanwhile keeps its result (False).
    """
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
                return False
            session.commit()
    except IntegrityError:
        log.info("series id %s was scored by another worker meanwhile", series_id)
        return False
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
    return True
