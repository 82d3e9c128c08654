"""The Celery tasks: one per stage of `service.pipeline`, registered on a worker's app; and the sweeper.

Task and queue names, the app and the publisher live in `service.celery_app`; the stages themselves
(what each reads and writes) in `service.pipeline`. Each task's only argument is an internal id,
never patient data. Each task re-checks the series state in the database before working, so a
duplicate or late message does nothing; the next stage is queued only after the stage's
transaction committed. A worker process loads the detector and the segmenter once, on the first
task that needs each (`Models`). Transient export failures are retried by Celery with the
countdown that `service.pacs_export.deliver` computes (exponential backoff); permanent ones end
the chain.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from celery import Celery
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service import pipeline
from service.celery_app import (
    DELIVER_SEG_TASK,
    PROCESS_SERIES_TASK,
    SCORE_SERIES_TASK,
    SEGMENT_SERIES_TASK,
    CeleryPublisher,
    Next,
    Publisher,
    make_celery_app,
)
from service.db.session import make_engine, make_session_factory
from service.db.tables import ExportState
from service.dicom_send import ExportNotConfiguredError
from service.pacs_export import deliver
from service.settings import Settings

if TYPE_CHECKING:
    from service.inference import Detector
    from service.segmentation import Segmenter

log = logging.getLogger(__name__)


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
    publisher = CeleryPublisher(app, settings)
    worker_name = f"{socket.gethostname()}:{os.getpid()}"

    def then(nxt: Next) -> None:
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
        # One export message per object written (export_format "both": the SEG and the RTSTRUCT).
        for nxt in pipeline.segment(
            sessions=sessions, settings=settings, series_id=int(series_id), segmenter=segmenter
        ):
            then(nxt)

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
        if delivery.state in (ExportState.DELIVERED, ExportState.FAILED):
            # The pipeline moves the series after its export settled.
            pipeline.export_settled(sessions=sessions, export_id=int(export_id))


class PipelineSweeper:
    """Runs `pipeline.sweep` at most every `pipeline_sweep_interval_s`; called by the listener's assembler."""

    def __init__(self, *, publisher: Publisher, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.publisher = publisher
        self._last = float("-inf")

    def __call__(self, now: Any = None) -> pipeline.SweepReport | None:
        if time.monotonic() - self._last < self.settings.pipeline_sweep_interval_s:
            return None
        self._last = time.monotonic()
        return pipeline.sweep(sessions=self.sessions, settings=self.settings, publisher=self.publisher, now=now)


def listener_jobs(settings: Settings) -> tuple[CeleryPublisher, list[PipelineSweeper]]:
    """What `gatekeeper listen` hands its listener's assembler: the publisher and the pipeline's sweeper.

    Built once per listener process, with a database engine of their own.
    """
    publisher = CeleryPublisher(make_celery_app(settings), settings)
    sessions = make_session_factory(make_engine(settings.database_url))
    return publisher, [PipelineSweeper(publisher=publisher, settings=settings, sessions=sessions)]
