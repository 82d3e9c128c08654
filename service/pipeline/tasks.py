"""The Celery tasks: one per stage of `service.pipeline`, registered on a worker's app; and the sweeper.

Task and queue names, the app and the publisher live in `service.celery_app`; the stages themselves
(what each reads and writes) in the stage modules of `service.pipeline`. Each task's only argument is an internal id,
never patient data. Each task re-checks the series state in the database before working, so a
duplicate or late message does nothing; the next stage is queued only after the stage's
transaction committed. A worker process asks the model registry for the active detector, segmenter
and gate per task and loads each version once (`Models`). Transient export failures are retried
by Celery with the countdown that `service.pacs_export.deliver` computes (exponential backoff);
permanent ones end the chain.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service import model_registry
from service.celery_app import (
    DELIVER_SEG_TASK,
    MATCH_CONTOURS_TASK,
    PROCESS_SERIES_TASK,
    SCORE_SERIES_TASK,
    SEGMENT_SERIES_TASK,
    CeleryPublisher,
    Next,
    Publisher,
    make_celery_app,
)
from service.db.session import make_engine, make_session_factory
from service.db.tables import ExportState, ModelKind
from service.dicom_send import ExportNotConfiguredError
from service.gate import Gate
from service.pacs_export import deliver, next_in_line
from service.pipeline import contouring, exporting, scoring, segmenting, starting, sweeper
from service.settings import Settings

if TYPE_CHECKING:
    from service.inference import Detector, PatchDetector
    from service.segmentation import Segmenter

log = logging.getLogger(__name__)


class Models:
    """The models of one worker process: the registry's active version of each kind.

    With `sessions`, every call asks the model registry (`service.model_registry`) which version is
    active — a promotion or a rollback takes effect at the next task, without a restart — and
    loads each version once, keyed by its files' hash (the `keep` most recently used per kind stay
    loaded). The first call on an empty registry registers the settings' model as active. Without
    `sessions` (no database), the settings' folders are used. The gate is optional: without an
    active one and without a gate.json in `Settings.gate_model_dir`, `gate()` is the rules-only gate.
    """

    def __init__(self, settings: Settings, sessions: sessionmaker[Session] | None = None, *, keep: int = 2) -> None:
        self.settings = settings
        self.sessions = sessions
        self.keep = max(1, keep)
        self._lock = threading.Lock()
        self._loaded: dict[ModelKind, OrderedDict[str, Any]] = {kind: OrderedDict() for kind in ModelKind}

    def _shipped(self, kind: ModelKind) -> bool:
        """Whether the settings name a model of `kind` (only the gate may have none)."""
        return kind != ModelKind.GATE or (model_registry.shipped_folder(self.settings, kind) / "gate.json").is_file()

    def _get(self, kind: ModelKind, load: Callable[[Path], Any]) -> Any:
        """The loaded active model of `kind`; None when there is none (a gate only)."""
        record = None
        if self.sessions is not None:
            if self._shipped(kind):
                record = model_registry.ensure_active(sessions=self.sessions, settings=self.settings, kind=kind)
            else:
                with self.sessions() as session:
                    record = model_registry.active_model(session=session, kind=kind)
                if record is None:
                    return None
        elif not self._shipped(kind):
            return None
        key = record.sha256 if record is not None else "settings"
        with self._lock:
            cache = self._loaded[kind]
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
            if record is not None:
                folder = model_registry.verify_files(record, self.settings)
                log.info("%s %s is active; loading it from %s", kind.value, record.version, folder)
            else:
                folder = model_registry.shipped_folder(self.settings, kind)
            cache[key] = load(folder)
            while len(cache) > self.keep:
                cache.popitem(last=False)
            return cache[key]

    def detector(self) -> Detector | PatchDetector:
        """The active detector (CUDA provider when present, else CPU)."""
        from service.inference import load_detector

        def load(folder: Path) -> Detector | PatchDetector:
            return load_detector(folder, batch=self.settings.score_batch)

        detector: Detector | PatchDetector = self._get(ModelKind.DETECTOR, load)
        return detector

    def segmenter(self) -> Segmenter:
        """The active liver segmenter."""
        from service.segmentation import Segmenter

        segmenter: Segmenter = self._get(ModelKind.SEGMENTER, Segmenter)
        return segmenter

    def gate(self) -> Gate:
        """The active gate (its gate.json), or the rules-only gate when there is none."""
        gate: Gate | None = self._get(ModelKind.GATE, Gate.load)
        return gate if gate is not None else Gate.rules_only()


def register_pipeline_tasks(
    app: Celery,
    *,
    settings: Settings,
    sessions: sessionmaker[Session],
    models: Models | None = None,
    worker_name: str | None = None,
) -> None:
    """Register every pipeline task (and the export task) on a worker's Celery app.

    `worker_name` (the Celery node name, e.g. "gatekeeper-score@gpu-host-2"; default host:pid) goes
    into the series events of the work this worker does, so that one can tell which host did what.
    """
    models = models or Models(settings, sessions)
    publisher = CeleryPublisher(app, settings)
    worker_name = worker_name or f"{socket.gethostname()}:{os.getpid()}"

    def then(nxt: Next) -> None:
        # After the stage's commit. If the broker refuses, the sweeper finds the series stuck and re-queues it.
        try:
            publisher.publish(nxt)
        except Exception:
            log.warning("could not queue stage %s for id %s; the sweeper will", nxt.stage, nxt.id, exc_info=True)

    @app.task(name=PROCESS_SERIES_TASK, ignore_result=True, acks_late=True)
    def process_series(series_id: int) -> None:
        then(starting.start(sessions=sessions, series_id=int(series_id), worker=worker_name))

    @app.task(name=SCORE_SERIES_TASK, ignore_result=True, acks_late=True)
    def score_series(series_id: int) -> None:
        then(
            scoring.score(
                sessions=sessions,
                settings=settings,
                series_id=int(series_id),
                detector=models.detector(),
                worker=worker_name,
            )
        )

    @app.task(name=SEGMENT_SERIES_TASK, ignore_result=True, acks_late=True)
    def segment_series(series_id: int) -> None:
        # Forward mode sends the series to an external node: the segmenter is never loaded.
        internal = settings.segmentation_mode == "internal"
        segmenter = models.segmenter() if internal else None
        gate = models.gate() if internal else None
        # One export message per object written (export_format "both": the SEG and the RTSTRUCT).
        for nxt in segmenting.segment(
            sessions=sessions,
            settings=settings,
            series_id=int(series_id),
            segmenter=segmenter,
            gate=gate,
            worker=worker_name,
        ):
            then(nxt)

    @app.task(name=MATCH_CONTOURS_TASK, ignore_result=True, acks_late=True)
    def match_contours(series_id: int) -> None:
        then(contouring.match_contours(sessions=sessions, settings=settings, series_id=int(series_id)))

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
        if delivery.attempted:
            # The PACS answered (or this export settled): the next export waiting for it may go.
            waiting = next_in_line(sessions=sessions, export_id=int(export_id))
            if waiting is not None:
                then(Next("export", waiting))
        if delivery.retry_after_s is not None:
            raise self.retry(countdown=delivery.retry_after_s, queue=settings.export_queue)
        if delivery.state in (ExportState.DELIVERED, ExportState.FAILED):
            # The pipeline moves the series after its export settled.
            exporting.export_settled(sessions=sessions, export_id=int(export_id), worker=worker_name)


class PipelineSweeper:
    """Runs `service.pipeline.sweeper.sweep` at most every `pipeline_sweep_interval_s`; called by the listener's assembler."""

    def __init__(self, *, publisher: Publisher, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.publisher = publisher
        self._last = float("-inf")

    def __call__(self, now: Any = None) -> sweeper.SweepReport | None:
        if time.monotonic() - self._last < self.settings.pipeline_sweep_interval_s:
            return None
        self._last = time.monotonic()
        return sweeper.sweep(sessions=self.sessions, settings=self.settings, publisher=self.publisher, now=now)


class ContourQueuer:
    """Runs `service.pipeline.contouring.queue_contours` every round of the listener's assembler (returned contours)."""

    def __init__(self, *, publisher: Publisher, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.publisher = publisher

    def __call__(self, now: Any = None) -> list[int]:
        return contouring.queue_contours(
            sessions=self.sessions, settings=self.settings, publisher=self.publisher, now=now
        )


def listener_jobs(settings: Settings) -> tuple[CeleryPublisher, list[PipelineSweeper | ContourQueuer]]:
    """What `gatekeeper listen` hands its listener's assembler: the publisher, the pipeline's sweeper
    and the queuer of returned contours.

    Built once per listener process, with a database engine of their own.
    """
    publisher = CeleryPublisher(make_celery_app(settings), settings)
    sessions = make_session_factory(make_engine(settings.database_url))
    return publisher, [
        PipelineSweeper(publisher=publisher, settings=settings, sessions=sessions),
        ContourQueuer(publisher=publisher, settings=settings, sessions=sessions),
    ]
