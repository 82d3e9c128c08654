"""Pictures for the reviewer: the slice-score plot (inline SVG), a slice with its residual heat map (PNG),
and the slice viewer's layers (a windowed slice, the heat map and the liver contour as transparent PNGs).

The residual map is the detector's per-pixel reconstruction error on one slice, downsampled (e.g.
64×64): where the slice differs from what the model expects of normal anatomy at that position.
Drawn over the windowed slice, it shows a dosimetrist where the detector saw something unusual.

Reading a DICOM slice is the slow part of drawing it; `SliceCache` keeps decoded slices (HU) and
the masks of a SEG in memory, bounded in bytes, least recently used out first.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError

from service.imaging import ABDOMEN_WINDOW, Window, apply_window, resize, to_hu

log = logging.getLogger(__name__)

# Inferno-like colour ramp (dark purple → red → yellow) for the residual; anchors at 0, .25, .5, .75, 1.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
# Opacity of the heat map where the residual is highest; lower residuals fade to transparent.
OVERLAY_ALPHA = 0.6
# Residuals below this fraction of the slice's maximum are not drawn (noise floor).
OVERLAY_FLOOR = 0.25


class ImageUnavailable(Exception):
    """The stored slice or residual map cannot be read or drawn; the message says which file and why."""


def resolve_stored(storage_dir: Path, relative_path: str) -> Path:
    """The absolute path of a file stored under `storage_dir`.

    Raises:
        ImageUnavailable: the path would lead outside `storage_dir`, or the file does not exist.
    """
    root = storage_dir.resolve()
    path = (root / relative_path).resolve()
    if not path.is_relative_to(root):
        raise ImageUnavailable(f"stored path {relative_path!r} leads outside the storage folder")
    if not path.is_file():
        raise ImageUnavailable(f"stored file {relative_path!r} is missing")
    return path


def colour_ramp(values: np.ndarray) -> np.ndarray:
    """RGB (float32, 0–255) of `values` in [0, 1] on the heat-map ramp; shape (*values.shape, 3)."""
    positions = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(positions).astype(np.int64).clip(0, len(_RAMP) - 2)
    frac = (positions - low)[..., None]
    rgb: np.ndarray = _RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac
    return rgb


def read_windowed_slice(path: Path, window: Window = ABDOMEN_WINDOW) -> np.ndarray:
    """The slice in `path` as float32 [0, 1] through the window (soft-tissue abdomen by default).

    Raises:
        ImageUnavailable: the file is not a readable single-frame image.
    """
    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
        slope = float(getattr(dataset, "RescaleSlope", 1.0))
        intercept = float(getattr(dataset, "RescaleIntercept", 0.0))
        hu = to_hu(pixels, slope, intercept)
    except (OSError, ValueError, AttributeError, TypeError, InvalidDicomError) as exc:
        raise ImageUnavailable(f"{path.name}: cannot read the slice ({exc})") from None
    if hu.ndim != 2:
        raise ImageUnavailable(f"{path.name}: pixel data has shape {hu.shape}; expected one 2-D frame")
    return apply_window(hu, window)


def overlay_residual(image: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """RGB uint8 of the windowed `image` ([0, 1]) with `residual` resized onto it as a heat map.

    The residual is scaled to its own maximum; values under OVERLAY_FLOOR of it stay transparent.
    """
    gray = np.repeat((image * 255.0)[..., None], 3, axis=-1)
    residual = np.nan_to_num(np.abs(residual.astype(np.float32)))
    peak = float(residual.max()) if residual.size else 0.0
    if peak <= 0:
        return gray.astype(np.uint8)
    level = resize(residual / peak, image.shape).clip(0.0, 1.0)
    alpha = (OVERLAY_ALPHA * np.clip((level - OVERLAY_FLOOR) / (1 - OVERLAY_FLOOR), 0.0, 1.0))[..., None]
    return (gray * (1 - alpha) + colour_ramp(level) * alpha).clip(0, 255).astype(np.uint8)


def render_slice_png(*, dicom_path: Path, residual_path: Path | None) -> bytes:
    """PNG of one slice: the windowed slice, and beside it the same slice with the residual heat map.

    Without a residual map, only the windowed slice.

    Raises:
        ImageUnavailable: the slice or the residual map cannot be read.
    """
    image = read_windowed_slice(dicom_path)
    plain = np.repeat((image * 255.0).astype(np.uint8)[..., None], 3, axis=-1)
    if residual_path is None:
        picture = plain
    else:
        try:
            residual = np.load(residual_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ImageUnavailable(f"{residual_path.name}: cannot read the residual map ({exc})") from None
        if residual.ndim != 2:
            raise ImageUnavailable(f"{residual_path.name}: residual map has shape {residual.shape}; expected 2-D")
        gap = np.full((image.shape[0], max(2, image.shape[1] // 64), 3), 255, dtype=np.uint8)
        picture = np.concatenate([plain, gap, overlay_residual(image, residual)], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(picture, mode="RGB").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def slice_score_svg(
    slices: Sequence[dict[str, Any]],
    *,
    threshold: float,
    top_indexes: Sequence[int] = (),
    width: int = 760,
    height: int = 240,
) -> str:
    """An inline SVG plot of slice score along the body axis (head left, feet right), with the threshold.

    Slices above the threshold are drawn red, the top slices (with residual maps) ringed and linked
    to their picture on the page (`#slice-<index>`). The text is fixed and every value numeric, so the
    result is safe to put in a page as it is.

    For the slice viewer, each point carries `data-index`, and the `<svg>` carries the plot's slice
    range and its x/y extent in SVG units (`data-first`, `data-last`, `data-x0`, `data-x1`,
    `data-y0`, `data-y1`), so that a click can be mapped to the nearest slice.
    """
    left, right, top, bottom = 52, 12, 12, 34
    points = sorted((int(s["index"]), float(s["score"])) for s in slices if s.get("score") is not None)
    if not points:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="60" role="img">'
            '<text x="10" y="30">no slice scores</text></svg>'
        )
    indexes = [i for i, _ in points]
    scores = [v for _, v in points]
    lo = min(min(scores), threshold)
    hi = max(max(scores), threshold)
    pad = (hi - lo) * 0.08 or 1.0
    lo, hi = lo - pad, hi + pad
    first, last = min(indexes), max(indexes)
    span = max(last - first, 1)

    def x(index: float) -> float:
        return left + (index - first) / span * (width - left - right)

    def y(value: float) -> float:
        return top + (hi - value) / (hi - lo) * (height - top - bottom)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="score-plot" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="slice score along the body axis" '
        f'data-first="{first}" data-last="{last}" data-x0="{x(first):.1f}" data-x1="{x(last):.1f}" '
        f'data-y0="{top}" data-y1="{height - bottom}">',
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
        'fill="#fafafa" stroke="#bbb"/>',
    ]
    for k in range(5):  # y ticks
        value = lo + (hi - lo) * k / 4
        parts.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end" font-size="11">{value:.3g}</text>')
    parts.append(
        '<polyline fill="none" stroke="#1f5fa8" stroke-width="1.5" points="'
        + " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in points)
        + '"/>'
    )
    parts.append(
        f'<line class="threshold" x1="{left}" x2="{width - right}" y1="{y(threshold):.1f}" '
        f'y2="{y(threshold):.1f}" stroke="#c0392b" stroke-dasharray="6 4" stroke-width="1.5"/>'
    )
    parts.append(
        f'<text x="{width - right - 4}" y="{y(threshold) - 5:.1f}" text-anchor="end" font-size="11" '
        f'fill="#c0392b">threshold {threshold:.3g}</text>'
    )
    tops = set(int(i) for i in top_indexes)
    for i, v in points:
        colour = "#c0392b" if v > threshold else "#1f5fa8"
        dot = (
            f'<circle class="point" data-index="{i}" cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}">'
            f"<title>slice {i}: {v:.4g}</title></circle>"
        )
        if i in tops:
            dot = (
                f'<a href="#slice-{i}">{dot}<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="7" fill="none" '
                f'stroke="{colour}" stroke-width="1.5"/></a>'
            )
        parts.append(dot)
    step = max(1, round(span / 10))
    for i in range(first, last + 1, step):  # x ticks
        parts.append(f'<text x="{x(i):.1f}" y="{height - bottom + 14}" text-anchor="middle" font-size="11">{i}</text>')
    parts.append(
        f'<text x="{left}" y="{height - 4}" font-size="11">head</text>'
        f'<text x="{(left + width - right) / 2:.0f}" y="{height - 4}" text-anchor="middle" font-size="11">'
        "slice index along the body axis</text>"
        f'<text x="{width - right}" y="{height - 4}" text-anchor="end" font-size="11">feet</text></svg>'
    )
    return "".join(parts)


# --- the slice viewer's layers ------------------------------------------------------------------------

# Colour of the liver contour (RGB) and its opacity; the outline is one pixel wide per CONTOUR_PIXELS_PER_WIDTH
# image rows (at least one), inside the mask: 2 px on a 512² slice.
CONTOUR_RGB = (0, 230, 118)
CONTOUR_ALPHA = 235
CONTOUR_PIXELS_PER_WIDTH = 256
# zlib level of the viewer's PNGs: 1 is several times faster than the default and ~10 % larger.
PNG_COMPRESS_LEVEL = 1


def read_hu_slice(path: Path) -> np.ndarray:
    """The slice in `path` in HU: int16 when the Modality LUT keeps integers (the usual CT), else float32.

    Raises:
        ImageUnavailable: the file is not a readable single-frame image.
    """
    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
        slope = float(getattr(dataset, "RescaleSlope", 1.0))
        intercept = float(getattr(dataset, "RescaleIntercept", 0.0))
        if slope == 1.0 and intercept.is_integer() and np.issubdtype(pixels.dtype, np.integer):
            hu = np.clip(pixels.astype(np.int32) + int(intercept), -32768, 32767).astype(np.int16)
        else:
            hu = to_hu(pixels, slope, intercept).astype(np.float32, copy=False)
    except (OSError, ValueError, AttributeError, TypeError, InvalidDicomError) as exc:
        raise ImageUnavailable(f"{path.name}: cannot read the slice ({exc})") from None
    if hu.ndim != 2:
        raise ImageUnavailable(f"{path.name}: pixel data has shape {hu.shape}; expected one 2-D frame")
    return hu


def read_seg_masks(path: Path) -> dict[str, np.ndarray]:
    """The masks of a BINARY/FRACTIONAL DICOM-SEG by source SOP Instance UID (every segment combined).

    Only slices with at least one segmented pixel are in the result; a referenced slice that is not
    in it has an empty mask.

    Raises:
        ImageUnavailable: the file is not a readable Segmentation.
    """
    try:
        seg = hd.seg.segread(path)
        sources = [
            str(item.ReferencedSOPInstanceUID)
            for series in seg.ReferencedSeriesSequence
            for item in series.ReferencedInstanceSequence
        ]
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=sources, combine_segments=True, skip_overlap_checks=True
        )
    except (OSError, ValueError, AttributeError, KeyError, TypeError, InvalidDicomError) as exc:
        raise ImageUnavailable(f"{path.name}: cannot read the segmentation ({exc})") from None
    masks = {}
    for uid, frame in zip(sources, np.asarray(pixels), strict=True):
        mask = frame > 0
        if mask.any():
            masks[uid] = mask
    return masks


def _nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values()) + 64 * len(value)
    return 64


class SliceCache:
    """A thread-safe LRU of what is slow to read from disk (decoded slices, SEG masks), bounded in bytes.

    Entries are keyed by the file's absolute path, size and modification time, so a file replaced on
    disk is read again. An entry larger than the whole budget is returned but not kept.
    """

    def __init__(self, *, max_bytes: int) -> None:
        """Raises: ValueError: `max_bytes` is not positive."""
        if max_bytes <= 0:
            raise ValueError(f"SliceCache.max_bytes must be > 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str, int, int], tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _get(self, kind: str, path: Path, read: Callable[[Path], Any]) -> Any:
        try:
            stat = path.stat()
        except OSError as exc:
            raise ImageUnavailable(f"{path.name}: cannot read ({exc.strerror})") from None
        key = (kind, str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
            self.misses += 1
        value = read(path)  # outside the lock: two threads may read the same file once each, harmlessly
        size = _nbytes(value)
        if size > self.max_bytes:
            return value
        with self._lock:
            if key not in self._entries:
                self._entries[key] = (value, size)
                self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped
        return value

    def hu_slice(self, path: Path) -> np.ndarray:
        """`read_hu_slice(path)`, from memory when it was read before.

        Raises:
            ImageUnavailable: see `read_hu_slice`.
        """
        hu: np.ndarray = self._get("hu", path, read_hu_slice)
        return hu

    def seg_masks(self, path: Path) -> dict[str, np.ndarray]:
        """`read_seg_masks(path)`, from memory when it was read before.

        Raises:
            ImageUnavailable: see `read_seg_masks`.
        """
        masks: dict[str, np.ndarray] = self._get("seg", path, read_seg_masks)
        return masks


def _png(picture: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture, mode=mode).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def window_png(hu: np.ndarray, window: Window) -> bytes:
    """Grayscale PNG of the HU slice `hu` through `window` (level = `window.center`, width = `window.width`)."""
    return _png((apply_window(hu, window) * 255.0 + 0.5).astype(np.uint8), "L")


def residual_layer_png(residual: np.ndarray, shape: tuple[int, int]) -> bytes:
    """Transparent RGBA PNG of `shape` with the residual heat map, to lay over the slice.

    Same colours and fading as `overlay_residual`: scaled to its own maximum, transparent below
    OVERLAY_FLOOR, at most OVERLAY_ALPHA opaque.

    Raises:
        ImageUnavailable: `residual` is not 2-D.
    """
    if residual.ndim != 2:
        raise ImageUnavailable(f"residual map has shape {residual.shape}; expected 2-D")
    residual = np.nan_to_num(np.abs(residual.astype(np.float32)))
    peak = float(residual.max()) if residual.size else 0.0
    rgba = np.zeros((*shape, 4), dtype=np.uint8)
    if peak > 0:
        level = resize(residual / peak, shape).clip(0.0, 1.0)
        alpha = OVERLAY_ALPHA * np.clip((level - OVERLAY_FLOOR) / (1 - OVERLAY_FLOOR), 0.0, 1.0)
        rgba[..., :3] = colour_ramp(level).clip(0, 255).astype(np.uint8)
        rgba[..., 3] = (alpha * 255.0).astype(np.uint8)
    return _png(rgba, "RGBA")


def contour_outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The pixels of `mask` within `width` pixels of its edge (4-neighbourhood), as bool."""
    inner = mask.astype(bool)
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        shrunk[0, :] = shrunk[-1, :] = False
        shrunk[:, 0] = shrunk[:, -1] = False
        inner = shrunk
    outline: np.ndarray = mask.astype(bool) & ~inner
    return outline


def contour_layer_png(mask: np.ndarray | None, shape: tuple[int, int]) -> bytes:
    """Transparent RGBA PNG of `shape` with the outline of `mask` (None: nothing on this slice).

    Raises:
        ImageUnavailable: the mask's shape is not `shape`.
    """
    rgba = np.zeros((*shape, 4), dtype=np.uint8)
    if mask is not None:
        if mask.shape != tuple(shape):
            raise ImageUnavailable(f"segmentation frame has shape {mask.shape}; the slice is {shape}")
        edge = contour_outline(mask, width=max(1, round(shape[0] / CONTOUR_PIXELS_PER_WIDTH)))
        rgba[edge] = (*CONTOUR_RGB, CONTOUR_ALPHA)
    return _png(rgba, "RGBA")
