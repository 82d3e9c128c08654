"""CT preprocessing shared by serving (service/) and training (models/): one source of truth.

Only numpy and scipy here — no torch, no pydicom objects beyond plain attribute reads — so the
exact same arithmetic runs when a model is trained and when a series is scored.

Conventions: images are float32 arrays in Hounsfield units (HU), indexed [row, column];
a series volume is [slice, row, column] ordered from head to feet (descending z in the
patient coordinate system for a head-first-supine axial scan).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

#: Pixels below this are air (outside the patient) for the body mask.
BODY_THRESHOLD_HU = -500.0


@dataclass(frozen=True)
class Window:
    """A display/analysis window: HU values in [center - width/2, center + width/2] map to [0, 1]."""

    center: float
    width: float

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise ValueError(f"Window.width must be > 0 HU, got {self.width}.")

    @property
    def low(self) -> float:
        return self.center - self.width / 2.0

    @property
    def high(self) -> float:
        return self.center + self.width / 2.0


#: The soft-tissue abdomen window radiologists read livers in.
ABDOMEN_WINDOW = Window(center=50.0, width=400.0)


def to_hu(stored: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Convert stored pixel values to HU with the DICOM Modality LUT (RescaleSlope/Intercept).

    Raises:
        ValueError: if the slope is zero or not finite (the file's rescale is unusable).
    """
    if not np.isfinite(slope) or slope == 0:
        raise ValueError(f"RescaleSlope must be finite and non-zero, got {slope}.")
    if not np.isfinite(intercept):
        raise ValueError(f"RescaleIntercept must be finite, got {intercept}.")
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def apply_window(hu: np.ndarray, window: Window = ABDOMEN_WINDOW) -> np.ndarray:
    """Map HU to [0, 1] through `window`, clipping outside it (float32)."""
    out = (hu.astype(np.float32) - np.float32(window.low)) / np.float32(window.width)
    return np.clip(out, 0.0, 1.0, out=out)


def body_mask(hu: np.ndarray, threshold: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """The patient's body on one slice: the largest connected region above `threshold`, holes filled.

    The patient table and small objects outside the body (separate components) are excluded; lungs
    and bowel gas inside the body are included because holes are filled. Returns a bool array.
    """
    above = hu > threshold
    labels, n = ndimage.label(above)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    # A lung touching the edge of the slice is still enclosed by ribs/muscle; fill per slice: a hole is a
    # background region (4-connected, as `ndimage.binary_fill_holes`) that does not reach the slice's
    # edge — one labelling instead of fill_holes' iterated dilation (5× faster at 512²).
    background, _ = ndimage.label(~body)
    edge = np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    outside = np.zeros(int(background.max()) + 1, bool)
    outside[edge] = True
    outside[0] = True  # label 0 is the body itself
    filled: np.ndarray = body | ~outside[background]
    return filled


def resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample a 2-D image to `shape` (rows, columns): area average when shrinking, linear otherwise."""
    rows, cols = image.shape
    if (rows, cols) == tuple(shape):
        return image.astype(np.float32, copy=False)
    if rows % shape[0] == 0 and cols % shape[1] == 0:
        fr, fc = rows // shape[0], cols // shape[1]
        pooled: np.ndarray = image.reshape(shape[0], fr, shape[1], fc).mean(axis=(1, 3), dtype=np.float32)
        return pooled
    zoom = (shape[0] / rows, shape[1] / cols)
    if zoom[0] < 1 or zoom[1] < 1:
        # Anti-alias before subsampling: Gaussian with sigma ~ half the shrink factor.
        sigma = (max(0.0, 0.5 / zoom[0] - 0.5), max(0.0, 0.5 / zoom[1] - 0.5))
        image = ndimage.gaussian_filter(image.astype(np.float32), sigma)
    zoomed: np.ndarray = ndimage.zoom(image.astype(np.float32), zoom, order=1, grid_mode=True, mode="nearest")
    return zoomed


def slice_normal(image_orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane from ImageOrientationPatient (row cosine × column cosine).

    Raises:
        ValueError: if ImageOrientationPatient does not hold two orthogonal unit vectors.
    """
    iop = np.asarray(image_orientation, dtype=np.float64)
    if iop.shape != (6,):
        raise ValueError(f"ImageOrientationPatient must have 6 values, got {iop.size}.")
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise ValueError(f"ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors.")
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def slice_order(positions: Sequence[Sequence[float]], image_orientation: Sequence[float]) -> np.ndarray:
    """Indices that sort slices from head to feet, whatever order the files came in.

    The distance of each ImagePositionPatient along the slice normal is the slice's location;
    for an axial scan the normal points to the head (+z), so descending distance is head → feet.
    """
    normal = slice_normal(image_orientation)
    distance = np.asarray(positions, dtype=np.float64) @ normal
    return np.argsort(-distance, kind="stable")


def slice_distances(positions: Sequence[Sequence[float]], image_orientation: Sequence[float]) -> np.ndarray:
    """Location of each slice along the slice normal in mm (same order as `positions`)."""
    distances: np.ndarray = np.asarray(positions, dtype=np.float64) @ slice_normal(image_orientation)
    return distances


# --- Model input: one function turns HU into what the detector sees ---------------------------------


def preprocess_slices(hu: np.ndarray, size: int, window: Window = ABDOMEN_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """HU slices [k, rows, cols] → detector images and body masks, both [k, size, size].

    Images are the HU resampled to `size`² (area average when shrinking), windowed to [0, 1] and
    scaled to [-1, 1] (float32). Masks are `body_mask` computed once at full resolution and then
    resampled (a pixel is body when more than half of it was). Training and serving both call this.

    Raises:
        ValueError: `hu` is not a 3-D stack, or `size` < 8.
    """
    images = slice_images(hu, size, window)
    masks = np.empty(images.shape, bool)
    for i in range(hu.shape[0]):
        masks[i] = resize(body_mask(hu[i]).astype(np.float32), (size, size)) > 0.5
    return images, masks


def slice_images(hu: np.ndarray, size: int, window: Window = ABDOMEN_WINDOW) -> np.ndarray:
    """The images of `preprocess_slices` [k, size, size] without the body masks (the position network's input).

    Raises:
        ValueError: `hu` is not a 3-D stack, or `size` < 8.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must be [slice, row, column], got shape {hu.shape}.")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}.")
    images = np.empty((hu.shape[0], size, size), np.float32)
    for i in range(hu.shape[0]):
        images[i] = apply_window(resize(hu[i], (size, size)), window) * 2.0 - 1.0
    return images


# --- Slice position along the body axis and series aggregation (training and serving) ------------------


def fit_series_positions(raw: np.ndarray, locations_mm: np.ndarray, mm_per_unit: float) -> np.ndarray:
    """Anatomical position of every slice from per-slice body-part-regression outputs.

    The regressor is trained so that its output grows by (distance in mm) / `mm_per_unit` from
    head to feet. Within a series the slice locations are known exactly, so only the series'
    offset is estimated — robustly, as the median of (output − metric distance from the first
    slice). The result is linear in the slice location and immune to single-slice outliers.
    `locations_mm` are the slice locations along the normal in volume order (head → feet).
    """
    raw = np.asarray(raw, np.float64)
    locations = np.asarray(locations_mm, np.float64)
    if raw.shape != locations.shape:
        raise ValueError(f"raw {raw.shape} and locations_mm {locations.shape} must have the same shape.")
    if not mm_per_unit > 0:
        raise ValueError(f"mm_per_unit must be > 0, got {mm_per_unit}.")
    metric = np.abs(locations[0] - locations) / mm_per_unit
    offset = float(np.median(raw - metric))
    positions: np.ndarray = (offset + metric).astype(np.float32)
    return positions


#: Series aggregations of slice scores the detector can choose from on validation data.
AGGREGATIONS = ("max", "top3_mean", "top5_mean", "smooth3_max", "smooth5_max")


def aggregate_slice_scores(scores: np.ndarray, method: str) -> float:
    """One series score from its slice scores (higher = more unlike the training normals).

    `max`: the worst slice. `topK_mean`: mean of the K worst slices (all if fewer).
    `smoothK_max`: max of the K-slice moving average along the body axis, so a finding must
    persist over neighbouring slices to count fully.

    Raises:
        ValueError: unknown `method`, or no scores.
    """
    s = np.asarray(scores, np.float64).ravel()
    if s.size == 0:
        raise ValueError("no slice scores to aggregate.")
    if method == "max":
        return float(s.max())
    if method.startswith("top") and method.endswith("_mean"):
        k = int(method[3:-5])
        return float(np.sort(s)[-k:].mean())
    if method.startswith("smooth") and method.endswith("_max"):
        k = min(int(method[6:-4]), s.size)
        return float(np.convolve(s, np.ones(k) / k, mode="valid").max())
    raise ValueError(f"unknown aggregation {method!r}; expected one of {', '.join(AGGREGATIONS)}.")


# --- v2 (patch, multi-window) input: fixed pixel spacing, body-centred field, window channels, patches ----
#
# The patch recipe (`gatekeeper train detector --recipe patch`, models/detector/patch/train.py) sees
# each slice resampled to a fixed pixel spacing in a fixed field centred on the body, as several CT
# windows stacked as channels, cut into small patches on a regular grid whose centre lies in the body.
# Every number below is written to the model's model.json, so serving reads it from there.

#: The liver window: hypodense lesions against parenchyma (≈ 2.7× the abdomen window's contrast).
LIVER_WINDOW = Window(center=70.0, width=150.0)
#: The metal window: (HU − 200) / 2800 clipped to [0, 1] — a 3000-HU stent stays apart from ≤ 1400-HU bone.
METAL_WINDOW = Window(center=1600.0, width=2800.0)
#: Channels of the patch recipe, in order (name, window).
PATCH_WINDOWS: tuple[tuple[str, Window], ...] = (
    ("abdomen", ABDOMEN_WINDOW),
    ("liver", LIVER_WINDOW),
    ("metal", METAL_WINDOW),
)
#: HU of what lies outside the scanned field (air).
AIR_HU = -1024.0


@dataclass(frozen=True)
class PatchGeometry:
    """The patch recipe's sampling: `spacing_mm` pixels in a `field_mm` square centred on the body's
    bounding box, patches of `patch` pixels on a `stride`-pixel grid.

    480 mm holds the widest scan field the phantoms use (≤ 461 mm) and so every body a scanner
    reconstructed whole; at 384 mm a large phantom patient (≈ 400+ mm across) was cut at the edges.
    The field's size costs memory and resampling only: patches are taken in the body alone.

    Raises:
        ValueError: a non-positive spacing or field, a patch that is odd or larger than the field,
            or a stride outside 1 … patch.
    """

    spacing_mm: float = 1.5
    field_mm: float = 480.0
    patch: int = 32
    stride: int = 16

    def __post_init__(self) -> None:
        if not self.spacing_mm > 0:
            raise ValueError(f"PatchGeometry.spacing_mm must be > 0, got {self.spacing_mm}.")
        if not self.field_mm >= self.spacing_mm:
            raise ValueError(f"PatchGeometry.field_mm must be >= spacing_mm, got {self.field_mm}.")
        if self.patch < 4 or self.patch % 2 or self.patch > self.field_px:
            raise ValueError(f"PatchGeometry.patch must be even, >= 4 and <= {self.field_px} px, got {self.patch}.")
        if not 1 <= self.stride <= self.patch:
            raise ValueError(f"PatchGeometry.stride must be within 1 … {self.patch} px, got {self.stride}.")

    @property
    def field_px(self) -> int:
        """Rows (= columns) of the resampled field: 480 mm at 1.5 mm → 320."""
        return int(round(self.field_mm / self.spacing_mm))


def window_channels(hu: np.ndarray, windows: Sequence[Window] | None = None) -> np.ndarray:
    """HU [..., H, W] → [..., C, H, W] float32: each window mapped to [0, 1], then scaled to [-1, 1]."""
    ws = [w for _, w in PATCH_WINDOWS] if windows is None else list(windows)
    return np.stack([apply_window(hu, w) * 2.0 - 1.0 for w in ws], axis=-3)


def body_centre(body: np.ndarray) -> tuple[float, float]:
    """(row, column) of the centre of the body mask's bounding box; the image centre when it is empty."""
    rows, cols = np.nonzero(body)
    if rows.size:
        return (rows.min() + rows.max()) / 2.0, (cols.min() + cols.max()) / 2.0
    return (body.shape[0] - 1) / 2.0, (body.shape[1] - 1) / 2.0


def resample_to_field(
    hu: np.ndarray, pixel_spacing_mm: Sequence[float], geometry: PatchGeometry
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """One HU slice → (HU field [F, F], body mask [F, F], body bounding box (r0, r1, c0, c1) in field px).

    The slice is resampled (linear, after a Gaussian anti-alias filter when shrinking) to
    `geometry.spacing_mm` pixels in a `field_mm` square whose centre is the centre of the body's
    bounding box (`body_mask` at the native resolution; the image centre when the slice holds no
    body). Outside the scanned image is air (`AIR_HU`). A body wider than the field is cut at its
    edge; the box is then the cut body's. The box's ends are inclusive; an empty mask gives the
    whole field.

    Raises:
        ValueError: `hu` is not 2-D or a pixel spacing is not > 0.
    """
    if hu.ndim != 2:
        raise ValueError(f"hu must be one slice [row, column], got shape {hu.shape}.")
    sr, sc = (float(v) for v in pixel_spacing_mm)
    if not (sr > 0 and sc > 0):
        raise ValueError(f"pixel_spacing_mm must be > 0, got {tuple(pixel_spacing_mm)}.")
    body = body_mask(hu)
    centre = body_centre(body)
    f = geometry.field_px
    offsets = (np.arange(f, dtype=np.float64) - (f - 1) / 2.0) * geometry.spacing_mm
    # The field's grid is axis-aligned, so linear interpolation is separable: rows first, then columns
    # (`_interpolate_axis`; the same values as `map_coordinates(order=1, mode="constant")`, without its
    # per-pixel loop).
    rows = _axis_weights(centre[0] + offsets / sr, hu.shape[0])
    cols = _axis_weights(centre[1] + offsets / sc, hu.shape[1])
    image = hu.astype(np.float32)
    sigma = (max(0.0, 0.5 * geometry.spacing_mm / sr - 0.5), max(0.0, 0.5 * geometry.spacing_mm / sc - 0.5))
    if sigma[0] > 0 or sigma[1] > 0:
        image = ndimage.gaussian_filter(image, sigma)
    field = _interpolate_axis(_interpolate_axis(image, rows, 0, AIR_HU), cols, 1, AIR_HU)
    mask = _interpolate_axis(_interpolate_axis(body.astype(np.float32), rows, 0, 0.0), cols, 1, 0.0) > 0.5
    mr, mc = np.nonzero(mask)
    box = (int(mr.min()), int(mr.max()), int(mc.min()), int(mc.max())) if mr.size else (0, f - 1, 0, f - 1)
    return field.astype(np.float32), mask, box


@dataclass(frozen=True)
class _AxisWeights:
    """1-D linear interpolation at some coordinates: lower neighbour, its weight, and which lie inside."""

    lower: np.ndarray  # int64 index of the lower neighbour (clipped into the image)
    frac: np.ndarray  # float32 weight of the upper neighbour
    inside: np.ndarray  # bool: the coordinate lies within [0, n - 1]


def _axis_weights(coords: np.ndarray, n: int) -> _AxisWeights:
    inside = (coords >= 0) & (coords <= n - 1)
    lower = np.clip(np.floor(coords), 0, max(n - 2, 0)).astype(np.int64)
    frac = np.clip(coords - lower, 0.0, 1.0).astype(np.float32)
    return _AxisWeights(lower, frac, inside)


def _interpolate_axis(image: np.ndarray, w: _AxisWeights, axis: int, cval: float) -> np.ndarray:
    """`image` linearly interpolated along `axis` at `w`'s coordinates; `cval` where they lie outside the
    image (`map_coordinates`' mode "constant"). float32."""
    upper = np.minimum(w.lower + 1, image.shape[axis] - 1)
    shape = (-1, 1) if axis == 0 else (1, -1)
    frac = w.frac.reshape(shape)
    out: np.ndarray = np.take(image, w.lower, axis=axis) * (1.0 - frac) + np.take(image, upper, axis=axis) * frac
    if axis == 0:
        out[~w.inside, :] = cval
    else:
        out[:, ~w.inside] = cval
    return out.astype(np.float32, copy=False)


def preprocess_patch_series(
    hu: np.ndarray, pixel_spacing_mm: Sequence[float], geometry: PatchGeometry
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU slices [k, rows, cols] → HU fields [k, F, F] float32, body masks [k, F, F], boxes [k, 4] int
    (`resample_to_field` per slice). The window channels are `window_channels` of the fields.

    Raises:
        ValueError: `hu` is not a 3-D stack, or a pixel spacing is not > 0.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must be [slice, row, column], got shape {hu.shape}.")
    k, f = hu.shape[0], geometry.field_px
    fields = np.empty((k, f, f), np.float32)
    masks = np.empty((k, f, f), bool)
    boxes = np.empty((k, 4), np.int32)
    for i in range(k):
        fields[i], masks[i], boxes[i] = resample_to_field(hu[i], pixel_spacing_mm, geometry)
    return fields, masks, boxes


def patch_centres(mask: np.ndarray, geometry: PatchGeometry) -> np.ndarray:
    """[P, 2] (row, column) centres of the patches of one slice: top-left corners every `stride`
    pixels, the patch fully inside the field, kept when its centre pixel (top-left + patch/2) is body."""
    f, p = mask.shape[0], geometry.patch
    starts = np.arange(0, f - p + 1, geometry.stride)
    rr, cc = np.meshgrid(starts + p // 2, starts + p // 2, indexing="ij")
    centres = np.stack([rr.ravel(), cc.ravel()], axis=1)
    keep = mask[centres[:, 0], centres[:, 1]]
    out: np.ndarray = centres[keep].astype(np.int32)
    return out


def extract_patches(image: np.ndarray, centres: np.ndarray, patch: int) -> np.ndarray:
    """Patches [P, C, patch, patch] of `image` [C, F, F] at `centres` [P, 2] (as `patch_centres` gives)."""
    windows = np.lib.stride_tricks.sliding_window_view(image, (patch, patch), axis=(1, 2))
    top = np.asarray(centres, np.int64) - patch // 2
    out: np.ndarray = np.ascontiguousarray(windows[:, top[:, 0], top[:, 1]].transpose(1, 0, 2, 3))
    return out


def patch_conditions(position: float, centres: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """[P, 3] float32 conditioning of each patch: (slice position, x, y), each clipped to [0, 1].

    x and y are the patch centre's column and row relative to the body's bounding box
    (0 = left/top edge, 1 = right/bottom edge); the position is the slice's normalised body-axis
    position (0 ≈ head end, 1 ≈ foot end of the training range).
    """
    r0, r1, c0, c1 = (float(v) for v in box)
    c = np.asarray(centres, np.float64).reshape(-1, 2)
    x = (c[:, 1] - c0) / max(c1 - c0, 1.0)
    y = (c[:, 0] - r0) / max(r1 - r0, 1.0)
    cond = np.stack([np.full(c.shape[0], position, np.float64), x, y], axis=1)
    out: np.ndarray = np.clip(cond, 0.0, 1.0).astype(np.float32)
    return out


def fit_patch_normalisation(
    scores: np.ndarray,
    cond: np.ndarray,
    *,
    position_bins: int = 8,
    location_bins: int = 4,
    min_count: int = 30,
) -> dict[str, Any]:
    """Mean and standard deviation of normal patch scores per (position bin × patch-location bin).

    `scores` [P] are raw patch scores of validation normals, `cond` [P, 3] their (position, x, y).
    Bins split [0, 1] uniformly: `position_bins` along the body axis, `location_bins` × `location_bins`
    over (x, y) in the body's bounding box. A cell with fewer than `min_count` patches falls back to
    its position bin, a position bin with fewer to the global statistics (σ floored at 10 % of the
    global σ). Returns the JSON-ready table `patch_z_scores` reads.

    Raises:
        ValueError: no scores, or `cond` is not [P, 3].
    """
    s = np.asarray(scores, np.float64).ravel()
    c = np.asarray(cond, np.float64)
    if s.size == 0:
        raise ValueError("no patch scores to normalise.")
    if c.shape != (s.size, 3):
        raise ValueError(f"cond must be [{s.size}, 3], got {c.shape}.")
    g_mu, g_sigma = float(s.mean()), float(s.std()) + 1e-12
    floor = 0.1 * g_sigma
    pb = _bin(c[:, 0], position_bins)
    lb = _bin(c[:, 2], location_bins) * location_bins + _bin(c[:, 1], location_bins)
    mu = np.full((position_bins, location_bins * location_bins), g_mu)
    sigma = np.full_like(mu, g_sigma)
    source = np.zeros(mu.shape, np.int8)  # 2 = cell, 1 = position bin, 0 = global
    for i in range(position_bins):
        in_p = pb == i
        if in_p.sum() >= min_count:
            mu[i], sigma[i], source[i] = s[in_p].mean(), max(float(s[in_p].std()), floor), 1
        for j in range(location_bins * location_bins):
            cell = in_p & (lb == j)
            if cell.sum() >= min_count:
                mu[i, j], sigma[i, j], source[i, j] = s[cell].mean(), max(float(s[cell].std()), floor), 2
    return {
        "position_bins": position_bins,
        "location_bins": location_bins,
        "min_count": min_count,
        "global_mu": g_mu,
        "global_sigma": g_sigma,
        "mu": mu.round(8).tolist(),
        "sigma": sigma.round(8).tolist(),
        "source": source.tolist(),
    }


def _bin(values: np.ndarray, bins: int) -> np.ndarray:
    """Index of the uniform bin of [0, 1] each value falls in (values outside go to the end bins)."""
    out: np.ndarray = np.clip(np.floor(np.asarray(values, np.float64) * bins), 0, bins - 1).astype(np.int64)
    return out


def patch_z_scores(scores: np.ndarray, cond: np.ndarray, table: dict[str, Any]) -> np.ndarray:
    """z-scores [P] of raw patch scores against the normals at the same position and body location
    (`fit_patch_normalisation`'s table)."""
    c = np.asarray(cond, np.float64).reshape(-1, 3)
    nl = int(table["location_bins"])
    i = _bin(c[:, 0], int(table["position_bins"]))
    j = _bin(c[:, 2], nl) * nl + _bin(c[:, 1], nl)
    mu, sigma = np.asarray(table["mu"], np.float64), np.asarray(table["sigma"], np.float64)
    z: np.ndarray = (np.asarray(scores, np.float64).ravel() - mu[i, j]) / sigma[i, j]
    return z


def slice_scores_from_patches(z: np.ndarray, slice_index: np.ndarray, num_slices: int) -> np.ndarray:
    """Slice scores [num_slices]: the largest patch z-score of each slice (local evidence, not a mean);
    NaN for a slice without patches (no body in the field)."""
    out = np.full(num_slices, -np.inf)
    np.maximum.at(out, np.asarray(slice_index, np.int64), np.asarray(z, np.float64))
    out[~np.isfinite(out)] = np.nan
    return out


def series_score_in_range(
    slice_scores: np.ndarray, positions: np.ndarray, low: float, high: float, *, top: int = 3
) -> tuple[float, int]:
    """(series score, slices counted): the mean of the `top` highest slice scores among slices whose
    position lies within [low, high] (the training positions' range with its margin), ignoring NaN.

    Slices outside the range are left out: the normals never showed the model those positions, so
    their scores measure the scan range, not the patient. When no slice lies inside, every slice
    counts (the count returned then is 0, so a caller can say so).

    Raises:
        ValueError: scores and positions differ in length, or no slice has a score.
    """
    s = np.asarray(slice_scores, np.float64).ravel()
    p = np.asarray(positions, np.float64).ravel()
    if s.shape != p.shape:
        raise ValueError(f"slice_scores {s.shape} and positions {p.shape} must have the same shape.")
    inside = (p >= low) & (p <= high) & np.isfinite(s)
    chosen = s[inside] if inside.any() else s[np.isfinite(s)]
    if chosen.size == 0:
        raise ValueError("no slice has a score (no body in any slice).")
    return float(np.sort(chosen)[-top:].mean()), int(inside.sum())


def patch_z_map(z: np.ndarray, centres: np.ndarray, field_px: int, patch: int) -> np.ndarray:
    """One slice's evidence map [F, F] on the resampled grid: at each pixel the largest z-score of the
    patches that cover it; NaN where no patch does."""
    out = np.full((field_px, field_px), -np.inf, np.float32)
    h = patch // 2
    for (r, c), v in zip(np.asarray(centres, np.int64), np.asarray(z, np.float32)):
        view = out[r - h : r + h, c - h : c + h]
        np.maximum(view, v, out=view)
    out[~np.isfinite(out)] = np.nan
    return out


def field_map_to_image(
    field_map: np.ndarray, hu: np.ndarray, pixel_spacing_mm: Sequence[float], geometry: PatchGeometry, size: int
) -> np.ndarray:
    """A map on one slice's resampled field [F, F] (e.g. `patch_z_map`) → the same map on the slice's own
    image grid at `size`² (nearest field pixel; 0 outside the field and where the map is NaN), so that it
    overlays the image. `hu` is the slice the field was made from (its body fixes the field's centre)."""
    sr, sc = (float(v) for v in pixel_spacing_mm)
    centre = body_centre(body_mask(hu))
    f = geometry.field_px
    rows = (np.arange(size) + 0.5) * hu.shape[0] / size - 0.5
    cols = (np.arange(size) + 0.5) * hu.shape[1] / size - 0.5
    fi = np.rint((rows - centre[0]) * sr / geometry.spacing_mm + (f - 1) / 2.0).astype(np.int64)
    fj = np.rint((cols - centre[1]) * sc / geometry.spacing_mm + (f - 1) / 2.0).astype(np.int64)
    inside = (fi[:, None] >= 0) & (fi[:, None] < f) & (fj[None, :] >= 0) & (fj[None, :] < f)
    values = field_map[np.clip(fi, 0, f - 1)[:, None], np.clip(fj, 0, f - 1)[None, :]]
    out: np.ndarray = np.where(inside & np.isfinite(values), values, 0.0).astype(np.float32)
    return out
