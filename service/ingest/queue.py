"""The pipeline queue: completed series versions go to Celery (Redis broker) by internal id only.

The database, not the broker, is the source of truth. A series version moves
`complete -> queued` once its message is published and `queued -> scoring` when a worker takes it
(the pipeline's first stage, `service.pipeline.start`; a worker quick enough to take the message
before the publisher recorded it moves it `complete -> scoring`); a series that stays `queued` longer than
`Settings.queue_resend_after_s` is published again (broker restarted, message lost). The task is
idempotent: a second delivery of the same series version finds it already taken and does nothing.

Task arguments, log lines and metrics carry the internal series id only — never a patient name,
patient id, birth date or accession number.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.celery_app import Next, Publisher
from service.db.session import rows_changed
from service.db.tables import Series, utc_now
from service.lifecycle import SeriesState, transition

log = logging.getLogger(__name__)


def queue_due_series(
    *,
    sessions: sessionmaker[Session],
    publisher: Publisher,
    resend_after_s: float,
    now: dt.datetime | None = None,
) -> list[int]:
    """Publish every complete series version, and every one queued longer than `resend_after_s`.

    Superseded versions are not sent: a later version of the same series replaces them.
    Each series is claimed in the database (`queue_attempts`, `queued_at`) before its message is
    published, so two sweepers never both send it; a failed publication gives the claim back (if
    the database is unreachable then, the resend timeout catches it). Once the broker took the
    message the series moves to `queued` through the lifecycle (`service.lifecycle.transition`),
    which writes the "queued" (or "requeued") event. Returns the ids published in this round.
    """
    now = now or utc_now()
    resend_before = now - dt.timedelta(seconds=resend_after_s)
    with sessions() as session:
        due = session.execute(
            select(Series.id, Series.state, Series.queue_attempts)
            .where(Series.superseded.is_(False))
            .where(
                or_(
                    # Complete and not claimed by a publisher right now (`queued_at` is set with the
                    # claim; a claimer that died before publishing is retried after `resend_after_s`).
                    (Series.state == SeriesState.COMPLETE.value)
                    & (Series.queued_at.is_(None) | (Series.queued_at < resend_before)),
                    (Series.state == SeriesState.QUEUED.value) & (Series.queued_at < resend_before),
                )
            )
            .order_by(Series.id)
        ).all()
    published = []
    for series_id, state, attempts in due:
        # Claim first (committed), publish after: two processes sweeping at once never both send.
        # The claim is the attempt counter; the state moves once the broker took the message.
        with sessions.begin() as session:
            claimed = rows_changed(
                session.execute(
                    update(Series)
                    .where(Series.id == series_id, Series.state == state, Series.queue_attempts == attempts)
                    .values(queue_attempts=attempts + 1, queued_at=utc_now())
                )
            )
        if not claimed:
            continue  # another process queued it meanwhile
        try:
            publisher.publish(Next("start", series_id), attempt=attempts + 1)
        except Exception:  # broker down: give the claim back; the next round tries again
            log.warning("could not queue series id %s; will retry", series_id, exc_info=True)
            with sessions.begin() as session:
                session.execute(
                    update(Series)
                    .where(Series.id == series_id, Series.queue_attempts == attempts + 1)
                    .values(
                        queue_attempts=attempts,
                        queued_at=None if state == SeriesState.COMPLETE.value else resend_before,
                    )
                )
            break
        with sessions.begin() as session:
            # False when a worker took the message first (it moved the series on): nothing to record.
            transition(
                session=session,
                series_id=series_id,
                source=SeriesState(state),
                target=SeriesState.QUEUED,
                event="queued" if state == SeriesState.COMPLETE.value else "requeued",
                detail={"attempt": attempts + 1},
                values={"queued_at": utc_now()},
                where=[Series.queue_attempts == attempts + 1],
            )
        log.info("queued series id %s (attempt %s)", series_id, attempts + 1)
        published.append(series_id)
    return published
