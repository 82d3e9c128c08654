"""The Celery side of export: the `deliver_seg` task and the publisher that queues it.

The task's only argument is the export id (`Export.id`); the database says what to send and
whether it is still to be sent, so a redelivered or duplicated message does no harm (see
`service.pacs_export.deliver`). Transient failures are retried by Celery with the countdown that
`deliver` computes (exponential backoff); permanent ones end the chain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import ExportState
from service.pacs_export import ExportNotConfiguredError, deliver
from service.settings import Settings

log = logging.getLogger(__name__)

# Name of the task that makes one delivery attempt; its only argument is `Export.id`.
DELIVER_SEG_TASK = "gatekeeper.export.deliver_seg"


class ExportPublisher:
    """Sends `DELIVER_SEG_TASK` messages to the export queue; built once per process."""

    def __init__(self, app: Celery, queue: str) -> None:
        self.app = app
        self.queue = queue

    def publish(self, *, export_id: int, countdown_s: float = 0.0) -> None:
        """Queue one delivery attempt of export `export_id`, to run after `countdown_s` seconds.

        Raises any exception when the broker could not take the message; the export stays pending
        in the database, and a sweeper (`service.pacs_export.due_exports`) or an operator sends it again.
        """
        self.app.send_task(
            DELIVER_SEG_TASK, args=[export_id], queue=self.queue, countdown=countdown_s or None, retry=False
        )


def register_export_task(
    app: Celery,
    *,
    settings: Settings,
    sessions: sessionmaker[Session],
    on_settled: Callable[[int], None] | None = None,
) -> None:
    """Register `DELIVER_SEG_TASK` on a worker's Celery app (late acks, as the app is configured).

    `on_settled(export_id)` is called once an attempt left the export delivered or failed (the
    pipeline moves the series after it; see `service.pipeline.export_settled`).
    """

    @app.task(name=DELIVER_SEG_TASK, bind=True, ignore_result=True, max_retries=None, acks_late=True)
    def deliver_seg(self: Any, export_id: int) -> None:
        try:
            delivery = deliver(sessions=sessions, settings=settings, export_id=int(export_id))
        except ExportNotConfiguredError as exc:
            # Nothing can be sent until someone configures the PACS; the export stays pending.
            log.error("export %s not sent: %s; retrying in %.0f s", export_id, exc, settings.export_retry_max_s)
            raise self.retry(countdown=settings.export_retry_max_s, queue=settings.export_queue) from None
        except OperationalError:
            log.warning(
                "export %s: database unreachable; retrying in %.0f s",
                export_id,
                settings.export_retry_initial_s,
                exc_info=True,
            )
            raise self.retry(countdown=settings.export_retry_initial_s, queue=settings.export_queue) from None
        except LookupError:
            log.error("export %s does not exist; message dropped", export_id)
            return
        if delivery.retry_after_s is not None:
            raise self.retry(countdown=delivery.retry_after_s, queue=settings.export_queue)
        if on_settled is not None and delivery.state in (ExportState.DELIVERED, ExportState.FAILED):
            on_settled(int(export_id))
