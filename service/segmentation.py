"""Liver auto-segmentation with an exported ONNX model (ONNX Runtime only; no torch).

The model contract — what any segmentation model must offer to be configured instead of ours:

* a folder with `model.json` and the ONNX file it names (`file`);
* the ONNX graph takes `image`: float32 `[N, C, S, S]`, C = 2·context_slices + 1 neighbouring
  axial slices (the slice to segment in the middle; the first/last slice repeated at the ends),
  each resampled to S×S and windowed to [0, 1] through `window_center_hu`/`window_width_hu`;
* it returns `probability`: float32 `[N, S, S]`, the liver probability of the middle slice, and
  optionally `features`: float32 `[N, F]` (bottleneck features, used only by the evaluation);
* `model.json` holds `format` (1), `kind` ("ct-liver-segmenter"), `file`, `input`
  (`size`, `context_slices`, `window_center_hu`, `window_width_hu`), `threshold` (probability
  cut, e.g. 0.5), `segment` (label and SNOMED CT code of what is segmented), `version` (a hash
  of the ONNX file; it goes into the DICOM-SEG as the algorithm version) and `name`.

The probability map is resampled to the series' own matrix, cut at `threshold`, and the largest
3-D connected component kept (with holes filled slice by slice).
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

    Raises:
        ValueError: size < 16, context_slices < 0 or window width <= 0 (message names the field).
    """

    size: int
    context_slices: int
    window: imaging.Window

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"input.size must be >= 16 pixels, got {self.size}.")
        if self.context_slices < 0:
            raise ValueError(f"input.context_slices must be >= 0, got {self.context_slices}.")

    @property
    def channels(self) -> int:
        return 2 * self.context_slices + 1

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> SegmenterInput:
        return cls(
            size=int(meta["size"]),
            context_slices=int(meta["context_slices"]),
            window=imaging.Window(float(meta["window_center_hu"]), float(meta["window_width_hu"])),
        )


def prepare_volume(hu: np.ndarray, spec: SegmenterInput) -> np.ndarray:
    """HU [k, rows, cols] → windowed float32 [k, S, S] in [0, 1] (training and serving both call this)."""
    if hu.ndim != 3:
        raise ValueError(f"hu must be [slice, row, column], got shape {hu.shape}.")
    out = np.empty((hu.shape[0], spec.size, spec.size), np.float32)
    for i in range(hu.shape[0]):
        out[i] = imaging.apply_window(imaging.resize(hu[i], (spec.size, spec.size)), spec.window)
    return out


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

    def prepare(self, hu: np.ndarray) -> np.ndarray:
        """HU [k, rows, cols] → the network's windowed volume [k, S, S] (see `prepare_volume`)."""
        return prepare_volume(hu, self.input)

    def probabilities(self, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Liver probability [k, S, S] at the network's size and features [k, F] (or None)."""
        return self.probabilities_of_volume(self.prepare(hu))

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
        probs, features = self.probabilities(series.hu)
        return self.segmentation_from(series, probs, features)

    def segmentation_from(self, series: CTSeries, probs: np.ndarray, features: np.ndarray | None) -> Segmentation:
        """The segmentation of `series` from its probabilities [k, S, S] at the network's size."""
        k, rows, cols = series.hu.shape
        full = np.empty((k, rows, cols), bool)
        for i in range(k):
            full[i] = imaging.resize(probs[i], (rows, cols)) > self.threshold
        mask = largest_component(full)
        entropy = binary_entropy(probs)
        # Entropy where the decision is made: inside the dilated predicted liver at network size.
        small = resize_mask(mask, self.input.size) if mask.any() else probs > self.threshold
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
