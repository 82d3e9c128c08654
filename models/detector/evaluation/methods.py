"""What every scoring method of the evaluation shares: one series' inputs, computed once
(`SeriesInputs`), one method's output (`Scored`) and what the evaluation needs of a method (`Method`).

Each detector family implements `Method` in its own `scoring` module (`models/detector/<family>/`);
`models.detector.family.load_method` picks it from model.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from models.detector.evaluation.localisation import anomaly_mask_on_grid
from service import imaging

if TYPE_CHECKING:
    from service.dicom_series import CTSeries


class SeriesInputs:
    """One series and what several methods share: preprocessed slices per (size, window) and the
    anomaly mask per map grid, each computed once."""

    def __init__(self, series: CTSeries, seg: Path | None) -> None:
        self.series = series
        self.seg = seg
        self._slices: dict[tuple[int, imaging.Window], tuple[np.ndarray, np.ndarray]] = {}
        self._truth: dict[int, np.ndarray] = {}

    def slices(self, size: int, window: imaging.Window) -> tuple[np.ndarray, np.ndarray]:
        """`imaging.preprocess_slices(series.hu, size, window)`: images [k, S, S] and body masks."""
        key = (size, window)
        if key not in self._slices:
            self._slices[key] = imaging.preprocess_slices(self.series.hu, size, window)
        return self._slices[key]

    def anomaly(self, size: int) -> np.ndarray:
        """The anomaly mask on the `size`² grid [k, S, S] (all False for a series without one)."""
        if size not in self._truth:
            k = self.series.num_slices
            self._truth[size] = (
                np.zeros((k, size, size), bool)
                if self.seg is None
                else anomaly_mask_on_grid(self.seg, self.series.sop_instance_uids, size)
            )
        return self._truth[size]


@dataclass
class Scored:
    """One method's output on one series.

    Attributes:
        slice_scores: [k] per slice, head → feet (≈ 0 typical, larger = more unusual).
        series_score: the method's own series score (compared with its threshold).
        positions: [k] the slice positions the method conditioned on (None: it has none).
        maps: [k, S, S] evidence maps in the slice's image geometry on the S² grid (None: no maps).
        grid: S; window: the window of the images shown under the maps (`SeriesInputs.slices`).
    """

    slice_scores: np.ndarray
    series_score: float
    positions: np.ndarray | None
    maps: np.ndarray | None
    grid: int
    window: imaging.Window


class Method(Protocol):
    """What the evaluation needs of a scoring method."""

    label: str
    threshold: float | None
    aggregation: str  # the report's description of the series aggregation
    meta: dict[str, Any]
    source: str  # the model folder or data it came from

    def score(self, inputs: SeriesInputs) -> Scored: ...


def training_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The training facts of a model.json the report shows (command, device, steps, seconds)."""
    t = meta.get("training", {})
    return {
        k: t[k]
        for k in ("command", "device_name", "steps", "train_seconds", "wall_seconds", "seconds")
        if t.get(k) is not None
    }


class DetectorMethod(Method, Protocol):
    """A method that is a detector: it has slice positions (the HU histogram borrows them), a series
    aggregation a baseline can borrow, and an ONNX Runtime provider the report names."""

    series_aggregation: str
    provider: str

    def positions(self, series: CTSeries) -> np.ndarray: ...
