"""The patch recipe's detector as an evaluation method (model.json format 2): scored through
`service.inference.PatchDetector`, its `PATCH_MAP_SIZE`² z-maps in the slice's image geometry."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.detector.evaluation.methods import Scored, SeriesInputs
from service import imaging
from service.inference import PATCH_AGGREGATION, PATCH_MAP_SIZE, PatchDetector

if TYPE_CHECKING:
    from service.dicom_series import CTSeries


def describe(meta: dict[str, Any]) -> str:
    """A short description of a patch-recipe model from its model.json, for reports."""
    pre = meta["preprocessing"]
    windows = "+".join(w["name"] for w in pre.get("windows", []))
    family, score = meta.get("family", "dcgan"), meta.get("patch_score", "mean")
    return f"patch recipe {family}, {score} score, {pre['patch']}² patches at {pre['spacing_mm']:g} mm, {windows}"


def patch_version(meta: dict[str, Any]) -> str:
    """Which patch recipe a format-2 model.json describes: v2 (GAN), v3 (AAE, noise per window) or v4 (AAE,
    coarse noise in HU)."""
    if meta.get("family") != "aae":
        return "patch v2"
    return "patch v4" if float((meta.get("aae_noise") or {}).get("hu_std") or 0) > 0 else "patch v3"


class PatchModel:
    """A format-2 detector (patch recipe): its own series score (top slices within the training
    positions' range), `PATCH_MAP_SIZE`² z-maps in the slice's image geometry."""

    def __init__(self, detector: PatchDetector, label: str, source: str) -> None:
        self.detector, self.label, self.source = detector, label, source
        self.threshold: float | None = detector.threshold
        self.aggregation = f"{PATCH_AGGREGATION} of in-range slices"
        self.series_aggregation = PATCH_AGGREGATION  # for a baseline that borrows the detector's aggregation
        self.meta = detector.meta

    def positions(self, series: CTSeries) -> np.ndarray:
        return self.detector.positions(series)

    def score(self, inputs: SeriesInputs) -> Scored:
        verdict = self.detector.score_series(inputs.series, keep_maps=True)
        scores = np.array([s.score for s in verdict.slices], np.float64)
        positions = np.array([s.position for s in verdict.slices], np.float32)
        assert verdict.residual_maps is not None  # keep_maps=True
        return Scored(
            scores,
            verdict.score,
            positions,
            uncovered_to_slice_minimum(verdict.residual_maps),
            PATCH_MAP_SIZE,
            imaging.ABDOMEN_WINDOW,
        )

    @property
    def provider(self) -> str:
        """The ONNX Runtime execution provider scoring this model."""
        return str(self.detector.provider)


def uncovered_to_slice_minimum(maps: np.ndarray) -> np.ndarray:
    """Patch z-maps [k, S, S] as served (0 where no patch lies) with those pixels set to the slice's
    lowest z, so that an uncovered body pixel (the body's rim between patch centres) is never the
    evidence peak while every covered pixel below 0 still is evidence. An exact 0.0 z is taken for "no
    patch" (a float z-score is exactly 0 with probability 0)."""
    out = maps.astype(np.float32, copy=True)
    for i in range(out.shape[0]):
        covered = out[i] != 0.0
        if covered.any():
            out[i][~covered] = out[i][covered].min()
    return out


def load_method(model_dir: Path, meta: dict[str, Any], label: str) -> PatchModel:
    """The patch-recipe detector in `model_dir` as an evaluation method.

    Raises:
        ValueError: an invalid model.json (message names the field).
    """
    return PatchModel(PatchDetector(model_dir), label, str(model_dir))
