"""The auto route's end of stage *segment*: the liver objects written, their `Export` rows, `exporting`.

`write_auto_objects` writes the DICOM-SEG and/or the RT Structure Set under `results/<series_id>/`
(`export_format`); `record_auto` records an `Export` per object and moves the series to `exporting`
(shadow mode: `withheld`, nothing sent). Called by `service.pipeline.segmenting.segment`.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from service import metrics
from service.celery_app import Next
from service.db.tables import Route, utc_now
from service.lifecycle import SeriesState, transition
from service.pipeline.store import atomic_write, cannot_segment, relative_to_storage, results_dir, write_liver_seg
from service.pipeline.withholding import withhold
from service.settings import Settings

if TYPE_CHECKING:  # the heavy objects come in as arguments, built once per worker process
    from service.segmentation import Segmenter

log = logging.getLogger(__name__)

S = SeriesState


def write_auto_objects(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    series_id: int,
    headers: Sequence[Any],
    mask: np.ndarray,
    segmenter: Segmenter,
    source_series_version: int,
    decided: dict[str, Any],
) -> list[Path] | None:
    """The auto route's objects under `results/<series_id>/` by `export_format` (the SEG always in shadow mode).

    `mask`: the segmenter's liver in the order of `headers`; `decided`: the gate's decision and the
    versions, for the worklist item when an object cannot be built.

    None when the headers do not make a valid object: the series went to the worklist
    ("cannot_segment"), nothing is sent.
    """
    from service.dicom_rtstruct import build_liver_rtstruct

    folder = results_dir(settings=settings, series_id=series_id)
    version = source_series_version
    written: list[Path] = []
    making = "SEG"
    try:
        if settings.export_format in ("seg", "both") or settings.mode == "shadow":
            written.append(folder / f"liver-seg-{segmenter.version}.dcm")
            write_liver_seg(
                path=written[-1],
                headers=headers,
                mask=mask,
                segmenter=segmenter,
                source_series_version=version,
            )
        if settings.export_format in ("rtstruct", "both"):
            making = "RT Structure Set"
            rtstruct = build_liver_rtstruct(
                source_images=headers,
                mask=mask,
                algorithm_name=segmenter.name[:64],
                algorithm_version=segmenter.version[:64],
                source_series_version=version,
                roi_name=settings.rtstruct_roi_name,
            )
            written.append(folder / f"liver-rtstruct-{segmenter.version}.dcm")
            atomic_write(written[-1], lambda tmp: rtstruct.save_as(tmp, enforce_file_format=True))
    except ValueError as exc:  # the headers do not make a valid object: nothing is sent, a person contours it
        problem = f"the liver {making} could not be built from the series' headers"
        cannot_segment(
            sessions=sessions,
            series_id=series_id,
            problem=f"{problem} ({type(exc).__name__}: {exc})",
            detail=decided,
        )
        return None
    return written


def record_auto(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    series_id: int,
    series_instance_uid: str,
    written: list[Path],
    decided: dict[str, Any],
    clock: dt.datetime,
) -> list[Next]:
    """The auto route's end: an `Export` per written object and `exporting` (shadow mode: `withheld`).

    `decided`: the route, the gate's decision and the versions, for the event. No PACS configured:
    `export_failed`. Returns one `Next("export", export_id)` per export to queue.
    """
    from service.dicom_send import ExportNotConfiguredError
    from service.pacs_export import record_export

    duration = (utc_now() - clock).total_seconds()
    metrics.record_stage("segment", duration)
    files = [relative_to_storage(path, settings.storage_dir) for path in written]
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
        decided["gate_version"],
        ", ".join(str(export_id) for export_id, _ in recorded),
        "recorded" if any(created for _, created in recorded) else "already recorded",
    )
    # The series moved, or a repeat recorded an export a crash left out: queue each new one (a
    # message for an export already sent or settled does nothing).
    return [Next("export", export_id) for export_id, created in recorded if moved or created]
