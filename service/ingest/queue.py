"""The pipeline queue: completed series versions go to Celery (Redis broker) by internal id only.

The database, not the broker, is the source of truth. A series version moves
`complete -> queued` when its message is published and `queued -> scoring` when a worker takes it
(the pipeline's first stage, `service.pipeline.start`); a series that stays `queued` longer than
`Settings.queue_resend_after_s` is published again (broker restarted, message lost). The task is
idempotent: a second delivery of the same series version finds it already taken and does nothing.

Task arguments, log lines and metrics carry the internal series id only — never a patient name,
patient id, birth date or accession number.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Protocol

from celery import Celery
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import Series, SeriesEvent, SeriesState, utc_now
from service.settings import Settings

log = logging.getLogger(__name__)

# Name of the task a pipeline worker runs for one series version; its only argument is `Series.id`.
PROCESS_SERIES_TASK = "gatekeeper.pipeline.process_series"


class Publisher(Protocol):
    """Sends one series version to the pipeline queue."""

    def publish(self, *, series_id: int, attempt: int) -> None:
        """Raises any exception when the message could not be handed to the broker."""


def make_celery_app(settings: Settings) -> Celery:
    """The Celery app for `settings.broker_url`, configured as Celery advises for long tasks.

    Late acknowledgement and prefetch 1, so a worker that dies mid-task leaves the message to
    another; JSON only; no result backend (the database records results).
    """
    app = Celery("gatekeeper", broker=settings.broker_url, set_as_current=False)
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # Fail fast when Redis is away (the caller retries later). An unacknowledged message is
        # handed to another worker only after the visibility timeout; it must outlast the longest
        # export backoff (a countdown task is held unacknowledged until it runs), or Redis would
        # deliver it twice. A worker that dies mid-task is covered by the pipeline's sweeper instead.
        transport_options: dict[str, object] = {
            "socket_timeout": 5,
            "socket_connect_timeout": 5,
            "visibility_timeout": settings.export_retry_max_s + 600,
        }
    elif settings.broker_url.startswith("filesystem://"):
        transport_options = {"polling_interval": 0.5}
    else:
        # kombu's SQLAlchemy transport (the embedded default) hands its options to create_engine: none.
        transport_options = {}
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.pipeline_queue,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        worker_hijack_root_logger=False,
        # Our own log lines (logging to stderr) stay ours; Celery must not capture stdout/stderr.
        worker_redirect_stdouts=False,
    )
    return app


class CeleryPublisher:
    """Publishes `PROCESS_SERIES_TASK` messages to one queue; built once per process."""

    def __init__(self, app: Celery, queue: str) -> None:
        self.app = app
        self.queue = queue

    def publish(self, *, series_id: int, attempt: int) -> None:
        # No retries here: the caller records the failure and the next round publishes again.
        self.app.send_task(
            PROCESS_SERIES_TASK,
            args=[series_id],
            queue=self.queue,
            task_id=f"series-{series_id}-attempt-{attempt}",
            retry=False,
        )


def queue_due_series(
    *,
    sessions: sessionmaker[Session],
    publisher: Publisher,
    resend_after_s: float,
    now: dt.datetime | None = None,
) -> list[int]:
    """Publish every complete series version, and every one queued longer than `resend_after_s`.

    Superseded versions are not sent: a later version of the same series replaces them.
    Each series is claimed in the database (state `queued`, `queued_at`, `queue_attempts`) before
    its message is published, so two sweepers never both send it; a failed publication gives the
    claim back (if the database is unreachable then, the resend timeout catches it). An event is
    written once the broker took the message. Returns the ids published in this round.
    """
    now = now or utc_now()
    resend_before = now - dt.timedelta(seconds=resend_after_s)
    with sessions() as session:
        due = session.execute(
            select(Series.id, Series.state, Series.queue_attempts)
            .where(Series.superseded.is_(False))
            .where(
                or_(
                    Series.state == SeriesState.COMPLETE.value,
                    (Series.state == SeriesState.QUEUED.value) & (Series.queued_at < resend_before),
                )
            )
            .order_by(Series.id)
        ).all()
    published = []
    for series_id, state, attempts in due:
        # Claim first (committed), publish after: two processes sweeping at once never both send.
        with sessions.begin() as session:
            claimed = session.execute(
                update(Series)
                .where(Series.id == series_id, Series.state == state, Series.queue_attempts == attempts)
                .values(
                    state=SeriesState.QUEUED.value,
                    queued_at=utc_now(),
                    state_changed_at=utc_now(),
                    queue_attempts=attempts + 1,
                )
            ).rowcount
        if not claimed:
            continue  # another process queued it meanwhile
        try:
            publisher.publish(series_id=series_id, attempt=attempts + 1)
        except Exception:  # broker down: give the claim back; the next round tries again
            log.warning("could not queue series id %s; will retry", series_id, exc_info=True)
            with sessions.begin() as session:
                session.execute(
                    update(Series)
                    .where(Series.id == series_id, Series.queue_attempts == attempts + 1)
                    .values(
                        state=state,
                        queue_attempts=attempts,
                        queued_at=None if state == SeriesState.COMPLETE.value else resend_before,
                    )
                )
            break
        with sessions.begin() as session:
            kind = "queued" if state == SeriesState.COMPLETE.value else "requeued"
            session.add(SeriesEvent(series_id=series_id, kind=kind, detail={"attempt": attempts + 1}))
        log.info("queued series id %s (attempt %s)", series_id, attempts + 1)
        published.append(series_id)
    return published
