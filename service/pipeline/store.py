"""What the pipeline's stages read and write: the series row, its stored files, the results folder, the worklist.

Shared by every stage module of `service.pipeline`; state changes still go through
`service.lifecycle.transition` (the lifecycle's one owner).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import dicom_series, imaging, metrics
from service.db.tables import Instance, Route, RouteReason, Series, WorklistItem, WorklistStatus
from service.lifecycle import SeriesState, transition
from service.settings import Settings

if TYPE_CHECKING:  # the heavy objects come in as arguments, built once per worker process
    from service.segmentation import Segmenter

log = logging.getLogger(__name__)

S = SeriesState


def series_row(session: Session, series_id: int) -> Series | None:
    """The row of series version `series_id`; None (and a warning) when it does not exist."""
    series = session.get(Series, series_id)
    if series is None:
        log.warning("series id %s does not exist; message dropped", series_id)
    return series


def instance_paths(*, session: Session, storage_dir: Path, series_id: int) -> dict[str, Path]:
    """The stored file of every instance of series version `series_id`, by SOP Instance UID."""
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.relative_path).where(Instance.series_id == series_id)
    ).all()
    return {uid: storage_dir / path for uid, path in rows}


def load_stored_series(paths: Iterable[Path]) -> dicom_series.CTSeries:
    """Read one stored series version as a CT volume in HU, slices head → feet.

    Raises:
        dicom_series.SeriesError: the files are not one usable CT series; the message says why.
    """
    groups = dicom_series.group_files(paths)
    if len(groups) != 1:
        uid = groups[0].series_instance_uid if groups else "(none)"
        raise dicom_series.SeriesError(uid, f"{len(groups)} series among the stored files; expected 1")
    return dicom_series.load_series(groups[0])


def results_dir(*, settings: Settings, series_id: int) -> Path:
    """The folder of a series version's pipeline results (residual maps, SEG) under `storage_dir`."""
    return settings.storage_dir / "results" / str(series_id)


def relative_to_storage(path: Path, storage_dir: Path) -> str:
    """`path` relative to `storage_dir`, as stored in the database (POSIX separators)."""
    return path.resolve().relative_to(storage_dir.resolve()).as_posix()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def save_top_residual_maps(
    *,
    settings: Settings,
    series_id: int,
    model_version: str,
    slices: Sequence[dict[str, Any]],
    residual_maps: np.ndarray | None,
) -> list[dict[str, Any]]:
    """Store the residual maps of the `settings.top_slices` highest-scoring slices; return `top_slices`.

    Each map (|x − G(E(x))| inside the body, detector resolution) is downsampled to
    `residual_map_size`² and saved as float16 `.npy` under `results/<series_id>/<model_version>/`.
    Each entry is `{"index", "score", "residual_map", "sop_instance_uid"}`, `residual_map` relative
    to `storage_dir` (None when the detector gave no maps); highest score first.
    """
    order = sorted(range(len(slices)), key=lambda i: slices[i]["score"], reverse=True)[: settings.top_slices]
    folder = results_dir(settings=settings, series_id=series_id) / model_version
    size = settings.residual_map_size
    top = []
    for i in order:
        relative = None
        if residual_maps is not None:
            small = imaging.resize(np.asarray(residual_maps[i], np.float32), (size, size)).astype(np.float16)
            path = folder / f"residual_{i:04d}.npy"
            atomic_write(path, partial(_save_npy, array=small))
            relative = relative_to_storage(path, settings.storage_dir)
        top.append(
            {
                "index": i,
                "score": slices[i]["score"],
                "residual_map": relative,
                "sop_instance_uid": slices[i]["sop_instance_uid"],
            }
        )
    return top


def draft_path(*, settings: Settings, series_id: int, segmenter_version: str) -> Path:
    """Where the draft SEG of a series the gate did not let through lies: stored, never sent.

    `results/<series_id>/liver-seg-draft-<segmenter version>.dcm`, where the series page's viewer
    finds a contour (`liver-seg-*.dcm`).
    """
    return results_dir(settings=settings, series_id=series_id) / f"liver-seg-draft-{segmenter_version}.dcm"


def to_worklist(
    *,
    session: Session,
    series_id: int,
    source: SeriesState | Iterable[SeriesState],
    reason: RouteReason,
    detail: dict[str, Any],
    event: str = "routed",
) -> bool:
    """Move the series to `worklisted` with a `WorklistItem` (one per series version) for `reason`."""
    moved = transition(
        session=session,
        series_id=series_id,
        source=source,
        target=S.WORKLISTED,
        event=event,
        detail={"route": Route.WORKLIST.value, "reason": reason.value, **detail},
        values={"route": Route.WORKLIST.value, "route_reason": reason.value},
    )
    if moved and session.scalar(select(WorklistItem.id).where(WorklistItem.series_id == series_id)) is None:
        session.add(
            WorklistItem(series_id=series_id, reason=reason.value, detail=detail, status=WorklistStatus.OPEN.value)
        )
    if moved:
        metrics.record_route(Route.WORKLIST.value, reason.value)
    return moved


def write_liver_seg(
    *, path: Path, headers: Sequence[Any], mask: np.ndarray, segmenter: Segmenter, source_series_version: int
) -> None:
    """Write the liver DICOM-SEG of `mask` (the segmenter's, in the order of `headers`) to `path`, atomically.

    Raises:
        ValueError: the headers do not make a valid SEG.
    """
    from service.dicom_seg import build_liver_seg

    seg = build_liver_seg(
        source_images=headers,
        mask=mask,
        algorithm_name=segmenter.name[:64],
        algorithm_version=segmenter.version[:64],
        source_series_version=source_series_version,
    )
    atomic_write(path, lambda tmp: seg.save_as(tmp, enforce_file_format=True))


def cannot_segment(*, sessions: sessionmaker[Session], series_id: int, problem: str, detail: dict[str, Any]) -> None:
    """A readable series that cannot be segmented or exported: to the worklist ("cannot_segment") at once.

    Never raised out of the stage: a retry would meet the same series and end, after the sweeper's
    attempts, as "unreadable" without the reason.
    """
    log.warning("series id %s: %s", series_id, problem)
    with sessions.begin() as session:
        to_worklist(
            session=session,
            series_id=series_id,
            source=S.SEGMENTING,
            reason=RouteReason.CANNOT_SEGMENT,
            detail={"problem": problem, **detail},
        )
