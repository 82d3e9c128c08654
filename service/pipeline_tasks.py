"""The Celery side of the pipeline: one task per stage of `service.pipeline`, the publisher, the sweeper.

Tasks (names readable in Flower; the only argument is an internal id, never patient data):

- `gatekeeper.pipeline.process_series` (series id), on `pipeline_queue` — stage *start*; the
  listener's ingest publishes it for every completed series version.
- `gatekeeper.pipeline.score_series` (series id), on `score_queue` (GPU workers) — stages *score*
  and *route*.
- `gatekeeper.pipeline.segment_series` (series id), on `segment_queue` — stage *segment* (in
  forward mode: the series is sent to the external segmentation node, and no segmenter loaded).
- `gatekeeper.export.deliver_seg` (export id), on `export_queue` — stage *export*
  (`service.export_tasks`).

The app is configured for long tasks (`service.ingest.queue.make_celery_app`: late acks,
prefetch 1, JSON only, no result backend). Each task re-checks the series state in the database
before working, so a duplicate or late message does nothing; the next stage is queued only after
the stage's transaction committed. A worker process loads the detector and the segmenter once,
on the first task that needs each (`Models`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from service import pipeline
from service.export_tasks import DELIVER_SEG_TASK, register_export_task
from service.ingest.queue import PROCESS_SERIES_TASK
from service.settings import Settings

if TYPE_CHECKING:
    from service.inference import Detector
    from service.segmentation import Segmenter

log = logging.getLogger(__name__)

SCORE_SERIES_TASK = "gatekeeper.pipeline.score_series"
SEGMENT_SERIES_TASK = "gatekeeper.pipeline.segment_series"

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
    return [getattr(settings, QUEUE_SETTINGS[name]) for name in logical]


class CeleryStagePublisher:
    """Queues pipeline stages (`pipeline.Next`) as Celery messages; built once per process."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def publish(self, nxt: pipeline.Next) -> None:
        """Send the message for `nxt` (nothing for `pipeline.DONE`); raises when the broker refuses it."""
        if nxt.stage is None or nxt.id is None:
            return
        task, queue = {
            "score": (SCORE_SERIES_TASK, self.settings.score_queue),
            "segment": (SEGMENT_SERIES_TASK, self.settings.segment_queue),
            "export": (DELIVER_SEG_TASK, self.settings.export_queue),
        }[nxt.stage]
        self.app.send_task(task, args=[int(nxt.id)], queue=queue, retry=False)


class Models:
    """The ONNX Runtime models of one worker process, each loaded once on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._detector: Detector | None = None
        self._segmenter: Segmenter | None = None

    def detector(self) -> Detector:
        """The detector of `settings.detector_model_dir` (CUDA provider when present, else CPU)."""
        with self._lock:
            if self._detector is None:
                from service.inference import Detector

                self._detector = Detector(self.settings.detector_model_dir, batch=self.settings.score_batch)
            return self._detector

    def segmenter(self) -> Segmenter:
        """The liver segmenter of `settings.segmenter_model_dir`."""
        with self._lock:
            if self._segmenter is None:
                from service.segmentation import Segmenter

                self._segmenter = Segmenter(self.settings.segmenter_model_dir)
            return self._segmenter


def register_pipeline_tasks(
    app: Celery, *, settings: Settings, sessions: sessionmaker[Session], models: Models | None = None
) -> None:
    """Register every pipeline task (and the export task) on a worker's Celery app."""
    models = models or Models(settings)
    publisher = CeleryStagePublisher(app, settings)
    worker_name = f"{socket.gethostname()}:{os.getpid()}"

    def then(nxt: pipeline.Next) -> None:
        # After the stage's commit. If the broker refuses, the sweeper finds the series stuck and re-queues it.
        try:
            publisher.publish(nxt)
        except Exception:
            log.warning("could not queue stage %s for id %s; the sweeper will", nxt.stage, nxt.id, exc_info=True)

    @app.task(name=PROCESS_SERIES_TASK, ignore_result=True, acks_late=True)
    def process_series(series_id: int) -> None:
        then(pipeline.start(sessions=sessions, series_id=int(series_id), worker=worker_name))

    @app.task(name=SCORE_SERIES_TASK, ignore_result=True, acks_late=True)
    def score_series(series_id: int) -> None:
        then(pipeline.score(sessions=sessions, settings=settings, series_id=int(series_id), detector=models.detector()))

    @app.task(name=SEGMENT_SERIES_TASK, ignore_result=True, acks_late=True)
    def segment_series(series_id: int) -> None:
        # Forward mode sends the series to an external node: the segmenter is never loaded.
        segmenter = models.segmenter() if settings.segmentation_mode == "internal" else None
        then(pipeline.segment(sessions=sessions, settings=settings, series_id=int(series_id), segmenter=segmenter))

    register_export_task(
        app,
        settings=settings,
        sessions=sessions,
        on_settled=lambda export_id: pipeline.export_settled(sessions=sessions, export_id=export_id),
    )


class PipelineSweeper:
    """Runs `pipeline.sweep` at most every `pipeline_sweep_interval_s`; called by the listener's assembler."""

    def __init__(self, *, app: Celery, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.publisher = CeleryStagePublisher(app, settings)
        self._last = float("-inf")

    def __call__(self, now: Any = None) -> pipeline.SweepReport | None:
        if time.monotonic() - self._last < self.settings.pipeline_sweep_interval_s:
            return None
        self._last = time.monotonic()
        return pipeline.sweep(sessions=self.sessions, settings=self.settings, publisher=self.publisher, now=now)
