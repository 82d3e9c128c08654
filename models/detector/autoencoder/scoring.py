"""The autoencoder baselines scored without torch (numpy and ONNX Runtime only), and as evaluation methods.

`AutoencoderBaseline` loads what `models.detector.autoencoder.train` exports (`autoencoder.onnx` +
`model.json`, the detector's preprocessing): the plain conv autoencoder (slice error = mean squared
error inside the body mask) or the coarse-noise denoising autoencoder (model.json `noise.kind`
"coarse"; slice error = the largest smoothed residual inside the body); either normalised on
validation normals inside the graph; residual map = |x − AE(x)| inside the mask. Series scores
aggregate slice scores with `service.imaging.aggregate_slice_scores`, like the detector.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from models.detector.evaluation.methods import Scored, SeriesInputs
from service import imaging

#: Kind string in the autoencoder's model.json.
AUTOENCODER_KIND = "ct-slice-autoencoder"


def describe(meta: dict[str, Any]) -> str:
    """A short description of an autoencoder from its model.json, for reports."""
    return "coarse-noise DAE" if meta.get("noise", {}).get("kind") == "coarse" else "conv autoencoder"


class AutoencoderBaseline:
    """A loaded autoencoder baseline, plain or coarse-noise denoising (ONNX Runtime session built once).

    Raises (constructor):
        FileNotFoundError: no model.json or ONNX file in `model_dir`.
        ValueError: model.json is not an autoencoder's or lacks a field (message names it).
    """

    def __init__(self, model_dir: Path | str, *, providers: Sequence[str] | None = None, batch: int = 32) -> None:
        self.model_dir = Path(model_dir)
        path = self.model_dir / "model.json"
        self.meta = json.loads(path.read_text())
        if self.meta.get("kind") != AUTOENCODER_KIND:
            raise ValueError(f"{path}: kind {self.meta.get('kind')!r}; expected {AUTOENCODER_KIND!r}")
        for key in ("size", "aggregation", "threshold", "preprocessing", "files"):
            if key not in self.meta:
                raise ValueError(f"{path}: field {key!r} missing")
        self.size = int(self.meta["size"])
        self.threshold = float(self.meta["threshold"])
        self.aggregation = str(self.meta["aggregation"])
        pre = self.meta["preprocessing"]
        self.window = imaging.Window(float(pre["window_center_hu"]), float(pre["window_width_hu"]))
        self.batch = batch
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(self.model_dir / self.meta["files"]["autoencoder"]),
            options,
            providers=list(providers) if providers else ["CPUExecutionProvider"],
        )

    def score_arrays(self, images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised slice scores [k] and residual maps [k, S, S] for preprocessed slices."""
        scores, maps = [], []
        for i in range(0, images.shape[0], self.batch):
            score, _, residual_map = self.session.run(
                None,
                {
                    "image": np.ascontiguousarray(images[i : i + self.batch, None], np.float32),
                    "mask": np.ascontiguousarray(masks[i : i + self.batch, None], np.float32),
                },
            )
            scores.append(score)
            maps.append(residual_map[:, 0])
        return np.concatenate(scores), np.concatenate(maps)


class AutoencoderModel:
    """An autoencoder baseline (plain or coarse-noise denoising): maps on its input grid."""

    def __init__(self, autoencoder: AutoencoderBaseline, label: str, source: str) -> None:
        self.autoencoder, self.label, self.source = autoencoder, label, source
        self.threshold: float | None = autoencoder.threshold
        self.aggregation = autoencoder.aggregation
        self.meta = autoencoder.meta

    def score(self, inputs: SeriesInputs) -> Scored:
        ae = self.autoencoder
        images, masks = inputs.slices(ae.size, ae.window)
        scores, maps = ae.score_arrays(images, masks)
        total = imaging.aggregate_slice_scores(scores, ae.aggregation)
        return Scored(scores, total, None, maps, ae.size, ae.window)


def load_method(model_dir: Path, meta: dict[str, Any], label: str) -> AutoencoderModel:
    """The autoencoder in `model_dir` as an evaluation method.

    Raises:
        FileNotFoundError, ValueError: see `AutoencoderBaseline`.
    """
    return AutoencoderModel(AutoencoderBaseline(model_dir), label, str(model_dir))
