"""The pipeline's sweeper: re-queues stuck stages, settles exported series, resends overdue exports.

The database is the truth: a message may be lost or delivered twice, a worker may die mid-stage.
`sweep` (run by the listener's assembler thread every `pipeline_sweep_interval_s`, through
`service.pipeline.tasks.PipelineSweeper`) queues a stage again when its series has stayed in it
longer than `pipeline_stuck_after_s`.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.celery_app import Next, Publisher
from service.db.session import rows_changed
from service.db.tables import Export, ExportState, RouteReason, Series, SeriesEvent, utc_now
from service.lifecycle import WORKING_STATES, SeriesState
from service.pipeline.exporting import export_settled
from service.pipeline.store import to_worklist
from service.settings import Settings

log = logging.getLogger(__name__)

S = SeriesState

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
        _requeue_stuck(
            sessions=sessions,
            settings=settings,
            publisher=publisher,
            series_id=series_id,
            state=SeriesState(state_value),
            changed_at=changed_at,
            now=now,
            report=report,
        )
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


def _requeue_stuck(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    publisher: Publisher,
    series_id: int,
    state: SeriesState,
    changed_at: dt.datetime | None,
    now: dt.datetime,
    report: SweepReport,
) -> None:
    """Queue the stage of a series stuck in `state` since `changed_at` again, or give up on it; noted in `report`.

    Claimed first (its `state_changed_at` moved to `now`), so of two sweepers only one acts. After
    `pipeline_max_requeues` "requeued" events for the state: the worklist ("unreadable", event
    "gave_up"). A refused publication leaves it for the next round.
    """
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
            return
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
            to_worklist(
                session=session,
                series_id=series_id,
                source=state,
                reason=RouteReason.UNREADABLE,
                detail={"problem": problem},
                event="gave_up",
            )
            report.gave_up.append(series_id)
            log.error("series id %s: %s; sent to the worklist", series_id, problem)
            return
        session.add(SeriesEvent(series_id=series_id, kind=kind, detail={"attempt": attempts + 1}, created_at=now))
    try:
        publisher.publish(Next(STAGE_OF_STATE[state], series_id))
    except Exception:  # broker away: the next round finds it stuck again
        log.warning("could not re-queue series id %s", series_id, exc_info=True)
        return
    log.warning("series id %s stuck in %s; queued again (attempt %s)", series_id, state.value, attempts + 1)
    report.requeued.append(series_id)
