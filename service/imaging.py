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
    # A lung touching the edge of the slice is still enclosed by ribs/muscle; fill per slice.
    filled: np.ndarray = ndimage.binary_fill_holes(body)
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
    if hu.ndim != 3:
        raise ValueError(f"hu must be [slice, row, column], got shape {hu.shape}.")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}.")
    k = hu.shape[0]
    images = np.empty((k, size, size), np.float32)
    masks = np.empty((k, size, size), bool)
    for i in range(k):
        images[i] = apply_window(resize(hu[i], (size, size)), window) * 2.0 - 1.0
        masks[i] = resize(body_mask(hu[i]).astype(np.float32), (size, size)) > 0.5
    return images, masks


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
