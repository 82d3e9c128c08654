"""Liver auto-segmentation with an exported ONNX model (ONNX Runtime only; no torch).

The model contract — what any segmentation model must offer to be configured instead of ours:

* a folder with `model.json` and the ONNX file it names (`file`);
* the ONNX graph takes `image`: float32 `[N, C, S, S]`, C = 2·context_slices + 1 neighbouring
  axial slices (the slice to segment in the middle; the first/last slice repeated at the ends),
  each resampled to S×S and windowed to [0, 1] through `window_center_hu`/`window_width_hu`.
  With `input.pixel_spacing_mm` the S×S field has that physical pixel size (aspect ratio kept),
  centred on the body's bounding box and coarser only when the body would not fit (`Framing`);
  without it (older models) the whole pixel matrix is resized to S×S;
* it returns `probability`: float32 `[N, S, S]`, the liver probability of the middle slice, and
  optionally `features`: float32 `[N, F]` (bottleneck features, used only by the evaluation);
* `model.json` holds `format` (1), `kind` ("ct-liver-segmenter"), `file`, `input`
  (`size`, `context_slices`, `window_center_hu`, `window_width_hu`), `threshold` (probability
  cut, e.g. 0.5), `segment` (label and SNOMED CT code of what is segmented), `version` (a hash
  of the ONNX file; it goes into the DICOM-SEG as the algorithm version) and `name`.

The probability map is resampled to the series' own matrix (`Framing.to_series`), cut at `threshold`,
and the largest 3-D connected component kept (with holes filled slice by slice).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from scipy import ndimage

from service import imaging
from service.dicom_series import CTSeries
from service.inference import choose_providers

log = logging.getLogger(__name__)

SUPPORTED_FORMAT = 1
KIND = "ct-liver-segmenter"
#: The segmenter shipped with the code (trained on `gatekeeper phantom dataset`; see its model.json).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "segmenter" / "default"


@dataclass(frozen=True)
class SegmenterInput:
    """How slices are prepared for the network, from `model.json` `input`.

    `pixel_spacing_mm`: the network's pixel size (mm) in a body-centred field, or None for the legacy
    framing (the whole pixel matrix resized to size², aspect ratio not kept).

    Raises:
        ValueError: size < 16, context_slices < 0, window width <= 0 or pixel_spacing_mm <= 0 (message
            names the field).
    """

    size: int
    context_slices: int
    window: imaging.Window
    pixel_spacing_mm: float | None = None

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"input.size must be >= 16 pixels, got {self.size}.")
        if self.context_slices < 0:
            raise ValueError(f"input.context_slices must be >= 0, got {self.context_slices}.")
        if self.pixel_spacing_mm is not None and not self.pixel_spacing_mm > 0:
            raise ValueError(f"input.pixel_spacing_mm must be > 0 mm, got {self.pixel_spacing_mm}.")

    @property
    def channels(self) -> int:
        return 2 * self.context_slices + 1

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> SegmenterInput:
        return cls(
            size=int(meta["size"]),
            context_slices=int(meta["context_slices"]),
            window=imaging.Window(float(meta["window_center_hu"]), float(meta["window_width_hu"])),
            pixel_spacing_mm=float(meta["pixel_spacing_mm"]) if meta.get("pixel_spacing_mm") is not None else None,
        )


#: Slices whose body masks fix a series' field (evenly spread; more cost time and change little).
FRAMING_SLICES = 24
#: The field holds the body's bounding box with this much room (a fraction of its extent).
FRAMING_MARGIN = 0.04


@dataclass(frozen=True)
class Framing:
    """Where the network's S×S field lies on a series' own pixel grid.

    Field row i samples series row `centre[0] + (i - (S - 1) / 2) * step[0]` (series pixel units), and
    likewise for columns; `spacing_mm` is the field's pixel size. `whole_matrix` is the legacy framing:
    the whole matrix resized to S×S (`imaging.resize`), aspect ratio not kept.

    Raises:
        ValueError: size < 1, a series shape or step that is not positive.
    """

    size: int
    series_shape: tuple[int, int]
    centre: tuple[float, float]
    step: tuple[float, float]
    spacing_mm: tuple[float, float]
    whole_matrix: bool = False

    def __post_init__(self) -> None:
        if self.size < 1 or min(self.series_shape) < 1:
            raise ValueError(f"Framing: size and series_shape must be >= 1, got {self.size}, {self.series_shape}.")
        if not min(self.step) > 0:
            raise ValueError(f"Framing.step must be > 0 series pixels, got {self.step}.")

    def _coords(self, axis: int) -> np.ndarray:
        return self.centre[axis] + (np.arange(self.size, dtype=np.float64) - (self.size - 1) / 2.0) * self.step[axis]

    def to_field(self, stack: np.ndarray, cval: float = imaging.AIR_HU) -> np.ndarray:
        """[k, rows, cols] on the series grid → float32 [k, S, S] on the field (linear, anti-aliased when
        shrinking; `cval` outside the series' matrix)."""
        s = self.size
        if self.whole_matrix:
            return np.stack([imaging.resize(a, (s, s)) for a in stack]).astype(np.float32, copy=False)
        image = stack.astype(np.float32, copy=False)
        sigma = (0.0, max(0.0, 0.5 * self.step[0] - 0.5), max(0.0, 0.5 * self.step[1] - 0.5))
        if sigma[1] > 0 or sigma[2] > 0:
            image = ndimage.gaussian_filter(image, sigma)
        out = _interpolate(image, self._coords(0), axis=1, cval=cval)
        return _interpolate(out, self._coords(1), axis=2, cval=cval)

    def mask_to_field(self, mask: np.ndarray) -> np.ndarray:
        """A bool [k, rows, cols] mask on the field [k, S, S] (a field pixel is in when more than half was)."""
        if self.whole_matrix:
            return resize_mask(mask, self.size)
        return self.to_field(mask.astype(np.float32), cval=0.0) > 0.5

    def to_series(self, field_maps: np.ndarray) -> np.ndarray:
        """Float maps [k, S, S] on the field → float32 [k, rows, cols] on the series grid (linear; 0 outside
        the field)."""
        rows, cols = self.series_shape
        if self.whole_matrix:
            return np.stack([imaging.resize(p, (rows, cols)) for p in field_maps])
        s = self.size
        fi = (np.arange(rows, dtype=np.float64) - self.centre[0]) / self.step[0] + (s - 1) / 2.0
        fj = (np.arange(cols, dtype=np.float64) - self.centre[1]) / self.step[1] + (s - 1) / 2.0
        out = _interpolate(field_maps.astype(np.float32, copy=False), fi, axis=1, cval=0.0)
        return _interpolate(out, fj, axis=2, cval=0.0)


def _interpolate(stack: np.ndarray, coords: np.ndarray, *, axis: int, cval: float) -> np.ndarray:
    """`stack` [k, a, b] linearly interpolated along `axis` (1 or 2) at `coords`; `cval` outside. float32."""
    n = stack.shape[axis]
    inside = (coords >= 0) & (coords <= n - 1)
    lower = np.clip(np.floor(coords), 0, max(n - 2, 0)).astype(np.int64)
    upper = np.minimum(lower + 1, n - 1)
    frac = np.clip(coords - lower, 0.0, 1.0).astype(np.float32)
    shape = (1, -1, 1) if axis == 1 else (1, 1, -1)
    f = frac.reshape(shape)
    out: np.ndarray = np.take(stack, lower, axis=axis) * (1.0 - f) + np.take(stack, upper, axis=axis) * f
    if axis == 1:
        out[:, ~inside, :] = cval
    else:
        out[:, :, ~inside] = cval
    return out.astype(np.float32, copy=False)


def frame_series(hu: np.ndarray, pixel_spacing_mm: tuple[float, float], spec: SegmenterInput) -> Framing:
    """The network's field on a series [k, rows, cols] with `pixel_spacing_mm` (row, column).

    With `spec.pixel_spacing_mm`: the field is centred on the bounding box of the body (`imaging.body_mask`
    on up to `FRAMING_SLICES` slices, one box for the whole series so neighbouring slices stay aligned) and
    has that pixel size, or a coarser one when the body (plus `FRAMING_MARGIN`) would not fit. Without it:
    the legacy whole-matrix framing.

    Raises:
        ValueError: `hu` is not 3-D or a pixel spacing is not > 0.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must be [slice, row, column], got shape {hu.shape}.")
    sr, sc = (float(v) for v in pixel_spacing_mm)
    if not (sr > 0 and sc > 0):
        raise ValueError(f"pixel_spacing_mm must be > 0, got {tuple(pixel_spacing_mm)}.")
    k, rows, cols = hu.shape
    s = spec.size
    if spec.pixel_spacing_mm is None:
        return Framing(
            size=s,
            series_shape=(rows, cols),
            centre=((rows - 1) / 2.0, (cols - 1) / 2.0),
            step=(rows / s, cols / s),
            spacing_mm=(rows * sr / s, cols * sc / s),
            whole_matrix=True,
        )
    # Body masks on a subsampled grid (2× when the matrix is large): the box needs millimetres, not pixels.
    sub = 2 if min(rows, cols) >= 384 else 1
    union = np.zeros((len(range(0, rows, sub)), len(range(0, cols, sub))), bool)
    for i in np.unique(np.linspace(0, k - 1, min(k, FRAMING_SLICES)).round().astype(int)):
        union |= imaging.body_mask(hu[i, ::sub, ::sub])
    r, c = np.nonzero(union)
    if r.size:
        r0, r1, c0, c1 = r.min() * sub, r.max() * sub + sub - 1, c.min() * sub, c.max() * sub + sub - 1
        centre = ((r0 + r1) / 2.0, (c0 + c1) / 2.0)
        extent_mm = max((r1 - r0 + 1) * sr, (c1 - c0 + 1) * sc)
    else:
        centre = ((rows - 1) / 2.0, (cols - 1) / 2.0)
        extent_mm = 0.0
    mm = max(spec.pixel_spacing_mm, extent_mm * (1.0 + FRAMING_MARGIN) / s)
    return Framing(size=s, series_shape=(rows, cols), centre=centre, step=(mm / sr, mm / sc), spacing_mm=(mm, mm))


def prepare_volume(hu: np.ndarray, spec: SegmenterInput, framing: Framing) -> np.ndarray:
    """HU [k, rows, cols] → windowed float32 [k, S, S] in [0, 1] on `framing`'s field (training and serving
    both call this)."""
    if hu.ndim != 3:
        raise ValueError(f"hu must be [slice, row, column], got shape {hu.shape}.")
    return imaging.apply_window(framing.to_field(hu), spec.window)


def context_stack(volume: np.ndarray, indices: np.ndarray, context_slices: int) -> np.ndarray:
    """Network input [len(indices), C, S, S]: each slice with its neighbours, ends repeated."""
    k = volume.shape[0]
    offsets = np.arange(-context_slices, context_slices + 1)
    picks = np.clip(np.asarray(indices)[:, None] + offsets[None, :], 0, k - 1)
    return volume[picks]


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A bool [k, rows, cols] mask resampled to [k, size, size] (a pixel is in when more than half was)."""
    return np.stack([imaging.resize(m.astype(np.float32), (size, size)) > 0.5 for m in mask])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 3-D connected component (26-connectivity) and fill holes per slice."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = labels == int(np.argmax(sizes))
    return np.stack([ndimage.binary_fill_holes(s) for s in keep])


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy (nats) of a Bernoulli probability, elementwise; 0 at p = 0 or 1."""
    q = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return -(q * np.log(q) + (1 - q) * np.log(1 - q))


def file_version(path: Path) -> str:
    """The first 16 hex digits of the SHA-256 of a model file: its version in DICOM-SEG and logs."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_model_json(model_dir: Path) -> dict[str, Any]:
    """The segmenter's model.json, checked against the contract above.

    Raises:
        FileNotFoundError: no model.json or no ONNX file in `model_dir`.
        ValueError: a required field is missing or wrong (the message names it).
    """
    path = Path(model_dir) / "model.json"
    meta: dict[str, Any] = json.loads(path.read_text())
    for key in ("format", "kind", "file", "input", "threshold", "segment", "version", "name"):
        if key not in meta:
            raise ValueError(f"{path}: field {key!r} missing")
    if meta["format"] != SUPPORTED_FORMAT:
        raise ValueError(f"{path}: format {meta['format']!r}; this gatekeeper reads format {SUPPORTED_FORMAT}")
    if meta["kind"] != KIND:
        raise ValueError(f"{path}: kind {meta['kind']!r}; expected {KIND!r}")
    if not 0 < float(meta["threshold"]) < 1:
        raise ValueError(f"{path}: threshold must be in (0, 1), got {meta['threshold']}")
    for key in ("size", "context_slices", "window_center_hu", "window_width_hu"):
        if key not in meta["input"]:
            raise ValueError(f"{path}: field 'input.{key}' missing")
    if not (Path(model_dir) / meta["file"]).is_file():
        raise FileNotFoundError(f"{Path(model_dir) / meta['file']}: model file named in model.json not found")
    return meta


@dataclass
class Segmentation:
    """The segmenter's result for one series, in the series' slice order (head → feet).

    Attributes:
        mask: bool [slice, row, column] liver mask at the series' own matrix.
        slice_entropy: mean binary entropy per slice inside the liver's neighbourhood (nats).
        features: bottleneck features per slice [k, F], or None if the model has none.
        entropy: the series' mean entropy over slices with liver (the softmax-entropy score).
        liver_volume_ml: volume of the mask, from pixel spacing and slice spacing.
    """

    series_instance_uid: str
    mask: np.ndarray
    slice_entropy: np.ndarray
    features: np.ndarray | None
    entropy: float
    liver_volume_ml: float

    def liver_slices(self) -> np.ndarray:
        return np.flatnonzero(self.mask.any(axis=(1, 2)))


class Segmenter:
    """A loaded segmenter: one ONNX Runtime session, built once, reused for every series."""

    def __init__(
        self, model_dir: Path | str = DEFAULT_MODEL_DIR, *, providers: list[str] | None = None, batch: int = 16
    ) -> None:
        self.model_dir = Path(model_dir)
        self.meta = read_model_json(self.model_dir)
        self.input = SegmenterInput.from_json(self.meta["input"])
        self.threshold = float(self.meta["threshold"])
        self.version = str(self.meta["version"])
        self.name = str(self.meta["name"])
        self.batch = batch
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(self.model_dir / self.meta["file"]),
            options,
            providers=list(providers) if providers else choose_providers(),
        )
        self.output_names = [o.name for o in self.session.get_outputs()]
        if "probability" not in self.output_names:
            raise ValueError(f"{self.model_dir / self.meta['file']}: no output named 'probability'")
        self.provider = self.session.get_providers()[0]
        log.info("segmenter %s version %s: ONNX Runtime provider %s", self.name, self.version, self.provider)

    def prepare(self, series: CTSeries) -> tuple[np.ndarray, Framing]:
        """The series → (the network's windowed volume [k, S, S], where that field lies on the series)."""
        framing = frame_series(series.hu, series.pixel_spacing_mm, self.input)
        return prepare_volume(series.hu, self.input, framing), framing

    def probabilities_of_volume(self, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Liver probability [k, S, S] and features [k, F] (or None) of a prepared volume [k, S, S]
        (the gate's test-time views flip or shift the prepared volume and call this)."""
        probs, feats = [], []
        want = ["probability"] + (["features"] if "features" in self.output_names else [])
        for start in range(0, volume.shape[0], self.batch):
            idx = np.arange(start, min(start + self.batch, volume.shape[0]))
            out = self.session.run(want, {"image": context_stack(volume, idx, self.input.context_slices)})
            probs.append(out[0])
            if len(out) > 1:
                feats.append(out[1])
        return np.concatenate(probs), (np.concatenate(feats) if feats else None)

    def segment(self, series: CTSeries) -> Segmentation:
        """Segment the liver in `series`; the mask has the series' own matrix."""
        volume, framing = self.prepare(series)
        probs, features = self.probabilities_of_volume(volume)
        return self.segmentation_from(series, probs, features, framing)

    def segmentation_from(
        self, series: CTSeries, probs: np.ndarray, features: np.ndarray | None, framing: Framing
    ) -> Segmentation:
        """The segmentation of `series` from its probabilities [k, S, S] on `framing`'s field."""
        k = series.hu.shape[0]
        mask = largest_component(framing.to_series(probs) > self.threshold)
        entropy = binary_entropy(probs)
        # Entropy where the decision is made: inside the dilated predicted liver at network size.
        small = framing.mask_to_field(mask) if mask.any() else probs > self.threshold
        region = ndimage.binary_dilation(small, iterations=3)
        per_slice = np.array([entropy[i][region[i]].mean() if region[i].any() else 0.0 for i in range(k)])
        with_liver = region.any(axis=(1, 2))
        series_entropy = float(per_slice[with_liver].mean()) if with_liver.any() else float(entropy.mean())
        voxel_ml = series.pixel_spacing_mm[0] * series.pixel_spacing_mm[1] * max(series.slice_spacing_mm, 1e-3) / 1000
        return Segmentation(
            series_instance_uid=series.series_instance_uid,
            mask=mask,
            slice_entropy=per_slice,
            features=features,
            entropy=series_entropy,
            liver_volume_ml=float(mask.sum() * voxel_ml),
        )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two bool volumes; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
