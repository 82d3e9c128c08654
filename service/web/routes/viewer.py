"""The slice viewer's data: every slice of a series version as PNG layers, and what the viewer needs to know.

- `GET /series/{uid}/versions/{v}/viewer.json` — the slices head → feet (index, SOP Instance UID,
  position, score), which have a residual heat map, whether a liver contour exists and on which
  slices, the threshold, the window presets and the URLs of the layers.
- `GET .../viewer/slices/{index}.png?wl=&ww=` — the slice through a window (level `wl`, width `ww`
  in HU; default abdomen W400/L40), grayscale.
- `GET .../viewer/slices/{index}/residual.png` — the detector's residual heat map (top slices only)
  and `GET .../viewer/slices/{index}/contour.png` — the outline of the stored liver segmentation,
  both transparent RGBA of the slice's size, to stack over the slice in the browser, so that an
  overlay is toggled without fetching the slice again.

Images carry `Cache-Control: private` and an ETag made of the source files' size and modification
time and the parameters; a matching `If-None-Match` answers 304 without reading the file. Decoded
slices and SEG masks stay in `SLICE_CACHE`, one per process, bounded in bytes.

Every route needs a login. 404 with a reason: unknown series, version or slice, a slice without a
residual map, a series without a contour, a stored file that is missing or unreadable; 422: a
window level or width out of range.
"""

# No `from __future__ import annotations`: FastAPI reads the dependency types at run time.
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
import pydicom
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import imaging
from service.db.tables import Instance, Series
from service.pipeline import results_dir
from service.settings import Settings
from service.web import crud
from service.web.deps import DB, AppSettings, CurrentUser, SliceIndex, Version
from service.web.images import (
    ImageUnavailable,
    SliceCache,
    contour_layer_png,
    residual_layer_png,
    resolve_stored,
    window_png,
)

log = logging.getLogger(__name__)

router = APIRouter()

#: Decoded slices (HU) and SEG masks of this process: 512 MiB holds about three 300-slice 512² series.
SLICE_CACHE = SliceCache(max_bytes=512 * 1024 * 1024)
#: How long the browser may keep a layer without asking again; a series version's files never change.
MAX_AGE_S = 3600
#: Bumped when a layer's drawing changes, so that browsers do not keep the old picture (part of the ETag).
RENDER_VERSION = "1"
#: Window presets (HU) offered by the viewer; the first is the default.
PRESETS = {
    "abdomen": imaging.Window(center=40.0, width=400.0),
    "liver": imaging.Window(center=70.0, width=150.0),
    "bone": imaging.Window(center=400.0, width=1800.0),
    "lung": imaging.Window(center=-600.0, width=1500.0),
}
DEFAULT_WINDOW = PRESETS["abdomen"]
#: The stored liver segmentations of a series version (the segment stage writes `liver-seg-<segmenter version>.dcm`
#: under `results_dir`); the newest file is shown.
CONTOUR_GLOB = "liver-seg-*.dcm"
NO_CONTOUR = "no contour for this series"


@dataclass(frozen=True)
class ViewerSlice:
    """One slice of a series version in volume order (head → feet), with what the viewer draws over it.

    `instance_path` and `residual_map` are relative to `Settings.storage_dir`; `instance_path` is
    None when the instance is not stored, `residual_map` None unless it is a top slice with a map.
    """

    index: int
    sop_instance_uid: str
    instance_path: str | None
    position: float | None
    score: float | None
    residual_map: str | None


# --- data (keyword-only, no HTTP) -------------------------------------------------------------------


def get_series_version(*, session: Session, series_instance_uid: str, version: int) -> Series:
    """The series version `version` of `series_instance_uid`.

    Raises:
        crud.NotFound: no such series or version.
    """
    series = session.scalar(
        select(Series).where(Series.series_instance_uid == series_instance_uid, Series.version == version)
    )
    if series is None:
        raise crud.NotFound(f"no version {version} of series {series_instance_uid}")
    return series


_ORDER_LOCK = threading.Lock()
_ORDER_CACHE: OrderedDict[tuple[int, int], list[tuple[str, float | None]]] = OrderedDict()
_ORDER_CACHE_SIZE = 64


def _order_by_position(*, storage_dir: Path, series_id: int, paths: dict[str, str]) -> list[tuple[str, float | None]]:
    """(SOP Instance UID, location in mm) of an unscored series' instances, head → feet.

    Read from the headers (ImagePositionPatient along the slice normal); when the geometry is
    missing or mixed, by InstanceNumber, then file name. Kept per (series version, instance count).
    """
    key = (series_id, len(paths))
    with _ORDER_LOCK:
        if key in _ORDER_CACHE:
            _ORDER_CACHE.move_to_end(key)
            return _ORDER_CACHE[key]
    headers = []
    for uid, relative in paths.items():
        try:
            ds = pydicom.dcmread(
                resolve_stored(storage_dir, relative),
                stop_before_pixels=True,
                specific_tags=["ImagePositionPatient", "ImageOrientationPatient", "InstanceNumber"],
            )
            position = [float(v) for v in ds.ImagePositionPatient]
            orientation = [float(v) for v in ds.ImageOrientationPatient]
        except (ImageUnavailable, OSError, InvalidDicomError, AttributeError, TypeError, ValueError):
            position, orientation, ds = None, None, None
        number = ds.get("InstanceNumber") if ds is not None else None
        headers.append((uid, relative, position, orientation, int(number) if number not in (None, "") else None))
    orientations = {tuple(np.round(h[3], 4)) for h in headers if h[3] is not None}
    if headers and all(h[2] is not None for h in headers) and len(orientations) == 1:
        positions = [h[2] for h in headers if h[2] is not None]
        normal_orientation = list(next(iter(orientations)))
        order = imaging.slice_order(positions, normal_orientation)
        distances = imaging.slice_distances(positions, normal_orientation)
        ordered: list[tuple[str, float | None]] = [(headers[k][0], round(float(distances[k]), 5)) for k in order]
    else:
        by_number = sorted(headers, key=lambda h: (h[4] is None, h[4] or 0, h[1]))
        ordered = [(h[0], None) for h in by_number]
    with _ORDER_LOCK:
        _ORDER_CACHE[key] = ordered
        while len(_ORDER_CACHE) > _ORDER_CACHE_SIZE:
            _ORDER_CACHE.popitem(last=False)
    return ordered


def viewer_slices(*, session: Session, settings: Settings, series: Series) -> tuple[list[ViewerSlice], float | None]:
    """The slices of `series` head → feet, and its threshold (None when the version was never scored).

    A scored version keeps the detector's order and indexes (those of the score plot); an unscored
    one is ordered from its headers.
    """
    paths = dict(
        session.execute(
            select(Instance.sop_instance_uid, Instance.relative_path).where(Instance.series_id == series.id)
        ).all()
    )
    score = crud.latest_scores(session=session, series_ids=[series.id]).get(series.id)
    if score is not None:
        residuals = {int(t["index"]): t.get("residual_map") for t in score.top_slices}
        slices = [
            ViewerSlice(
                index=int(s["index"]),
                sop_instance_uid=str(s.get("sop_instance_uid")),
                instance_path=paths.get(str(s.get("sop_instance_uid"))),
                position=s.get("position"),
                score=s.get("score"),
                residual_map=residuals.get(int(s["index"])),
            )
            for s in sorted(score.slices, key=lambda s: int(s["index"]))
        ]
        return slices, score.threshold
    ordered = _order_by_position(storage_dir=settings.storage_dir, series_id=series.id, paths=paths)
    return [
        ViewerSlice(index=i, sop_instance_uid=uid, instance_path=paths[uid], position=z, score=None, residual_map=None)
        for i, (uid, z) in enumerate(ordered)
    ], None


def contour_path(*, settings: Settings, series_id: int) -> Path | None:
    """The newest stored liver segmentation (DICOM-SEG) of a series version, or None when there is none."""
    folder = results_dir(settings=settings, series_id=series_id)
    found = sorted(folder.glob(CONTOUR_GLOB), key=lambda p: (p.stat().st_mtime_ns, p.name)) if folder.is_dir() else []
    return found[-1] if found else None


def _slice(slices: list[ViewerSlice], index: int, series: Series) -> ViewerSlice:
    """Raises: crud.NotFound: no slice `index`, or its instance is not stored."""
    entry = next((s for s in slices if s.index == index), None)
    if entry is None:
        raise crud.NotFound(
            f"series {series.series_instance_uid} version {series.version} has no slice {index} ({len(slices)} slices)"
        )
    if entry.instance_path is None:
        raise crud.NotFound(f"slice {index} of series {series.series_instance_uid}: its instance is not stored")
    return entry


def _series_slice(
    *, session: Session, settings: Settings, series_instance_uid: str, version: int, index: int
) -> tuple[Series, ViewerSlice]:
    """The series version and its slice `index`, for the image endpoints.

    Raises:
        crud.NotFound: no such series version or slice, or the slice's instance is not stored.
    """
    series = get_series_version(session=session, series_instance_uid=series_instance_uid, version=version)
    slices, _ = viewer_slices(session=session, settings=settings, series=series)
    return series, _slice(slices, index, series)


# --- HTTP helpers -----------------------------------------------------------------------------------


def _etag(*parts: Any, files: tuple[Path, ...]) -> str:
    """A strong ETag from `parts` and each file's path, size and modification time (no file is read)."""
    digest = hashlib.sha256(RENDER_VERSION.encode())
    for part in parts:
        digest.update(repr(part).encode())
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            raise ImageUnavailable(f"stored file {path.name} is missing") from None
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return f'"{digest.hexdigest()[:32]}"'


def _image_response(request: Request, etag: str, render: Callable[[], bytes]) -> Response:
    """304 when the browser holds `etag`, else the PNG `render()` draws, with the caching headers."""
    headers = {"Cache-Control": f"private, max-age={MAX_AGE_S}", "ETag": etag}
    if etag in (t.strip() for t in request.headers.get("if-none-match", "").split(",")):
        return Response(status_code=304, headers=headers)
    return Response(render(), media_type="image/png", headers=headers)


def _base_url(series: Series) -> str:
    return f"/series/{quote(series.series_instance_uid, safe='')}/versions/{series.version}"


# --- routes -----------------------------------------------------------------------------------------

Level = Annotated[float, Query(ge=-4000, le=4000, description="window level (centre) in HU")]
Width = Annotated[float, Query(ge=1, le=8000, description="window width in HU")]


@router.get("/series/{series_instance_uid}/versions/{version}/viewer.json")
def viewer_info(
    series_instance_uid: str, version: Version, user: CurrentUser, session: DB, settings: AppSettings
) -> Response:
    """What the slice viewer needs for one series version; see the module docstring."""
    series = get_series_version(session=session, series_instance_uid=series_instance_uid, version=version)
    slices, threshold = viewer_slices(session=session, settings=settings, series=series)
    seg = contour_path(settings=settings, series_id=series.id)
    contour_slices: list[int] = []
    contour_problem = None if seg is not None else NO_CONTOUR
    if seg is not None:
        try:
            masks = SLICE_CACHE.seg_masks(seg)
            contour_slices = [s.index for s in slices if s.sop_instance_uid in masks]
        except ImageUnavailable as exc:
            log.warning("series id %s: %s", series.id, exc)
            seg, contour_problem = None, f"the contour cannot be read: {exc}"
    base = _base_url(series)
    body = {
        "series_instance_uid": series.series_instance_uid,
        "version": series.version,
        "num_slices": len(slices),
        "threshold": threshold,
        "slices": [
            {
                "index": s.index,
                "sop_instance_uid": s.sop_instance_uid,
                "position": s.position,
                "score": s.score,
                "residual": s.residual_map is not None,
                "contour": s.index in contour_slices,
            }
            for s in slices
        ],
        "residual_slices": [s.index for s in slices if s.residual_map is not None],
        "contour": {"available": seg is not None, "slices": contour_slices, "reason": contour_problem},
        "presets": {name: {"level": w.center, "width": w.width} for name, w in PRESETS.items()},
        "window": {"level": DEFAULT_WINDOW.center, "width": DEFAULT_WINDOW.width},
        "urls": {
            "slice": f"{base}/viewer/slices/{{index}}.png",
            "residual": f"{base}/viewer/slices/{{index}}/residual.png",
            "contour": f"{base}/viewer/slices/{{index}}/contour.png",
        },
    }
    return JSONResponse(body, headers={"Cache-Control": "private, no-cache"})


@router.get("/series/{series_instance_uid}/versions/{version}/viewer/slices/{index}.png")
def viewer_slice(
    request: Request,
    series_instance_uid: str,
    version: Version,
    index: SliceIndex,
    user: CurrentUser,
    session: DB,
    settings: AppSettings,
    wl: Level = DEFAULT_WINDOW.center,
    ww: Width = DEFAULT_WINDOW.width,
) -> Response:
    """Slice `index` through the window level `wl`, width `ww` (HU), grayscale PNG."""
    series, entry = _series_slice(
        session=session, settings=settings, series_instance_uid=series_instance_uid, version=version, index=index
    )
    path = resolve_stored(settings.storage_dir, entry.instance_path or "")
    window = imaging.Window(center=wl, width=ww)
    etag = _etag("slice", wl, ww, files=(path,))
    return _image_response(request, etag, lambda: window_png(SLICE_CACHE.hu_slice(path), window))


@router.get("/series/{series_instance_uid}/versions/{version}/viewer/slices/{index}/residual.png")
def viewer_residual(
    request: Request,
    series_instance_uid: str,
    version: Version,
    index: SliceIndex,
    user: CurrentUser,
    session: DB,
    settings: AppSettings,
) -> Response:
    """The residual heat map of slice `index` as a transparent layer of the slice's size (top slices only)."""
    series, entry = _series_slice(
        session=session, settings=settings, series_instance_uid=series_instance_uid, version=version, index=index
    )
    if entry.residual_map is None:
        raise crud.NotFound(f"slice {index} has no residual map (only the highest-scoring slices have one)")
    path = resolve_stored(settings.storage_dir, entry.instance_path or "")
    residual_path = resolve_stored(settings.storage_dir, entry.residual_map)

    def render() -> bytes:
        try:
            residual = np.load(residual_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ImageUnavailable(f"{residual_path.name}: cannot read the residual map ({exc})") from None
        shape = SLICE_CACHE.hu_slice(path).shape
        return residual_layer_png(residual, (int(shape[0]), int(shape[1])))

    return _image_response(request, _etag("residual", files=(path, residual_path)), render)


@router.get("/series/{series_instance_uid}/versions/{version}/viewer/slices/{index}/contour.png")
def viewer_contour(
    request: Request,
    series_instance_uid: str,
    version: Version,
    index: SliceIndex,
    user: CurrentUser,
    session: DB,
    settings: AppSettings,
) -> Response:
    """The outline of the stored liver segmentation on slice `index`, a transparent layer (empty off the liver)."""
    series, entry = _series_slice(
        session=session, settings=settings, series_instance_uid=series_instance_uid, version=version, index=index
    )
    seg = contour_path(settings=settings, series_id=series.id)
    if seg is None:
        raise crud.NotFound(f"{NO_CONTOUR} (version {series.version})")
    path = resolve_stored(settings.storage_dir, entry.instance_path or "")

    def render() -> bytes:
        mask = SLICE_CACHE.seg_masks(seg).get(entry.sop_instance_uid)
        shape = SLICE_CACHE.hu_slice(path).shape
        return contour_layer_png(mask, (int(shape[0]), int(shape[1])))

    return _image_response(request, _etag("contour", entry.sop_instance_uid, files=(path, seg)), render)
