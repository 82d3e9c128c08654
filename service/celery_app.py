"""Celery, in one place: the app, the queue names, the task names and the one publisher.

Every message the product sends names one stage and one internal id — never patient data:

=========  ===========================================  ======================  =================
stage      task name (readable in Flower)               argument                queue (setting)
=========  ===========================================  ======================  =================
start      `gatekeeper.pipeline.process_series`         `Series.id`             `pipeline_queue`
score      `gatekeeper.pipeline.score_series`           `Series.id`             `score_queue`
segment    `gatekeeper.pipeline.segment_series`         `Series.id`             `segment_queue`
export     `gatekeeper.export.deliver_seg`              `Export.id`             `export_queue`
contour    `gatekeeper.pipeline.match_contours`         `Series.id` (stored     `pipeline_queue`
                                                        RTSTRUCT / SEG series)
=========  ===========================================  ======================  =================

Ingest publishes *start* for every completed series version; each pipeline stage publishes the
next one after its transaction committed (`service.pipeline`); the tasks themselves are
registered on a worker's app by `service.pipeline.tasks`. The app is built once per process by
the command that runs it (`listen`, `serve`, `worker`, `exports retry`, `flower`), never inside a
request or a task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from celery import Celery

from service.settings import Settings

PROCESS_SERIES_TASK = "gatekeeper.pipeline.process_series"
SCORE_SERIES_TASK = "gatekeeper.pipeline.score_series"
SEGMENT_SERIES_TASK = "gatekeeper.pipeline.segment_series"
DELIVER_SEG_TASK = "gatekeeper.export.deliver_seg"
# Returned contours (service/contours/): light work, on the light default queue.
MATCH_CONTOURS_TASK = "gatekeeper.pipeline.match_contours"

#: stage → (task name, the setting that names its queue)
STAGE_TASKS: dict[str, tuple[str, str]] = {
    "start": (PROCESS_SERIES_TASK, "pipeline_queue"),
    "score": (SCORE_SERIES_TASK, "score_queue"),
    "segment": (SEGMENT_SERIES_TASK, "segment_queue"),
    "export": (DELIVER_SEG_TASK, "export_queue"),
    "contour": (MATCH_CONTOURS_TASK, "pipeline_queue"),
}

#: The logical queue names of `gatekeeper worker --queues`, and the setting that names each queue.
QUEUE_SETTINGS = {
    "default": "pipeline_queue",
    "score": "score_queue",
    "segment": "segment_queue",
    "export": "export_queue",
}


def queue_names(settings: Settings, logical: list[str]) -> list[str]:
    """The broker queue names for logical names such as ["score", "export"].

    Raises:
        ValueError: a name is not one of `QUEUE_SETTINGS`.
    """
    unknown = [name for name in logical if name not in QUEUE_SETTINGS]
    if unknown:
        raise ValueError(f"unknown queue {unknown[0]!r}; expected some of {', '.join(QUEUE_SETTINGS)}")
    return [str(getattr(settings, QUEUE_SETTINGS[name])) for name in logical]


@dataclass(frozen=True)
class Next:
    """What to queue after a stage: `stage` ("start", "score", "segment", "export", "contour") for `id`; None: nothing."""

    stage: str | None
    id: int | None = None

    def __post_init__(self) -> None:
        if self.stage is not None and self.stage not in STAGE_TASKS:
            raise ValueError(f"stage {self.stage!r} is not one of {', '.join(STAGE_TASKS)}")


#: Nothing more to queue.
DONE = Next(None)


class Publisher(Protocol):
    """Sends the message for one stage; raises any exception when the broker did not take it."""

    def publish(self, nxt: Next, *, attempt: int | None = None, countdown_s: float = 0.0) -> None: ...


def make_celery_app(settings: Settings) -> Celery:
    """The Celery app for `settings.broker_url`, configured as Celery advises for long tasks.

    Late acknowledgement and prefetch 1, so a worker that dies mid-task leaves the message to
    another; JSON only; no result backend (the database records results).
    """
    app = Celery("gatekeeper", broker=settings.broker_url, set_as_current=False)
    transport_options: dict[str, object]
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # Fail fast when Redis is away (the caller retries later). An unacknowledged message is
        # handed to another worker only after the visibility timeout; it must outlast the longest
        # export backoff (a countdown task is held unacknowledged until it runs), or Redis would
        # deliver it twice. A worker that dies mid-task is covered by the pipeline's sweeper instead.
        transport_options = {
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
    """The one publisher: queues a stage's task on its queue; built once per process."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def publish(self, nxt: Next, *, attempt: int | None = None, countdown_s: float = 0.0) -> None:
        """Send the message for `nxt` (nothing for `DONE`), to run after `countdown_s` seconds.

        `attempt` makes the task id deterministic (`series-<id>-attempt-<n>` for *start*), so Flower
        shows resends as such. No retries here: the caller records the failure and the database
        state lets a sweeper send it again.

        Raises:
            Exception: whatever kombu raises when the broker did not take the message.
        """
        if nxt.stage is None or nxt.id is None:
            return
        task, queue_setting = STAGE_TASKS[nxt.stage]
        task_id = f"series-{nxt.id}-attempt-{attempt}" if attempt is not None and nxt.stage == "start" else None
        self.app.send_task(
            task,
            args=[int(nxt.id)],
            queue=str(getattr(self.settings, queue_setting)),
            task_id=task_id,
            countdown=countdown_s or None,
            retry=False,
        )
