"""The slice recipe's detector as an evaluation method (model.json format 1, family stylegan2 or dcgan):
scored through `service.inference.Detector`, evidence maps on its input grid."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.detector.evaluation.methods import Scored, SeriesInputs
from service import imaging
from service.inference import Detector

if TYPE_CHECKING:
    from service.dicom_series import CTSeries


def describe(meta: dict[str, Any]) -> str:
    """A short description of a slice-recipe model from its model.json, for reports."""
    return f"slice recipe, {meta.get('family')} {meta.get('size')}²"


class SliceModel:
    """A format-1 detector (slice recipe): maps on its input grid."""

    def __init__(self, detector: Detector, label: str, source: str) -> None:
        self.detector, self.label, self.source = detector, label, source
        self.threshold: float | None = detector.threshold
        self.aggregation = detector.aggregation
        self.series_aggregation = detector.aggregation
        self.meta = detector.meta

    def positions(self, series: CTSeries) -> np.ndarray:
        images = imaging.slice_images(series.hu, self.detector.size, self.detector.window)
        return self.detector.positions(images, series.locations_mm)

    def score(self, inputs: SeriesInputs) -> Scored:
        d = self.detector
        images, masks = inputs.slices(d.size, d.window)
        positions = d.positions(images, inputs.series.locations_mm)
        scores, maps = d.score_arrays(images, masks, positions)
        total = imaging.aggregate_slice_scores(scores, d.aggregation)
        return Scored(scores, total, positions, maps, d.size, d.window)

    @property
    def provider(self) -> str:
        """The ONNX Runtime execution provider scoring this model."""
        return str(self.detector.provider)


def load_method(model_dir: Path, meta: dict[str, Any], label: str) -> SliceModel:
    """The slice-recipe detector in `model_dir` as an evaluation method.

    Raises:
        ValueError: an invalid model.json (message names the field).
    """
    return SliceModel(Detector(model_dir), label, str(model_dir))
