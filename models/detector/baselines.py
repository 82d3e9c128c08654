"""The baseline every detector is evaluated against, scored without torch (numpy and ONNX Runtime only).

* `HistogramBaseline` — a HU-histogram statistic. Per slice, the fractions of body pixels in fixed
  HU bins (air … metal), square-rooted to steady their variance. Fitted on normal slices: per
  slice-position bin, the mean and spread of every feature; a slice's distance is the mean squared
  z-score of its features against its position bin, itself standardised by the distances of the
  training slices in that bin (≈ 0 typical, larger = more unusual). No network, no training.
(The autoencoder baselines are a family of their own: `models.detector.autoencoder`.)

Series scores aggregate slice scores with `service.imaging.aggregate_slice_scores`, like the detector.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import imaging

log = logging.getLogger(__name__)

#: HU bin edges of the histogram statistic: air, lung, fat, water/fluid, soft tissue, contrast,
#: bone, metal. Values outside the outer edges fall into the first or last bin.
HU_BIN_EDGES = (
    -1000.0,
    -900.0,
    -700.0,
    -500.0,
    -300.0,
    -150.0,
    -100.0,
    -60.0,
    -20.0,
    0.0,
    20.0,
    40.0,
    60.0,
    80.0,
    100.0,
    130.0,
    170.0,
    220.0,
    300.0,
    500.0,
    1000.0,
    2000.0,
)
#: Position bins of the histogram statistic over the conditioning position 0…1 (clamped).
POSITION_BINS = 10
#: Floor of a feature's spread (in √fraction units), so a bin no training slice uses stays finite.
MIN_FEATURE_SIGMA = 0.01


def hu_histograms(hu: np.ndarray, edges: Sequence[float] = HU_BIN_EDGES) -> np.ndarray:
    """Per slice, √(fraction of body pixels) in each HU bin: [k, len(edges) + 1] float64.

    The body is `imaging.body_mask` of the slice at full resolution; bins are (−∞, e0), [e0, e1), …,
    [e_last, ∞). A slice without body pixels gives all zeros.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must be [slice, row, column], got shape {hu.shape}.")
    edges_arr = np.asarray(edges, np.float64)
    out = np.zeros((hu.shape[0], edges_arr.size + 1))
    for i in range(hu.shape[0]):
        values = hu[i][imaging.body_mask(hu[i])]
        if values.size == 0:
            continue
        counts = np.bincount(np.searchsorted(edges_arr, values, side="right"), minlength=edges_arr.size + 1)
        out[i] = np.sqrt(counts / values.size)
    return out


def position_bin(positions: np.ndarray, bins: int = POSITION_BINS) -> np.ndarray:
    """Index of the position bin of every slice (positions clamped to 0…1)."""
    p = np.clip(np.asarray(positions, np.float64), 0.0, 1.0)
    index: np.ndarray = np.minimum((p * bins).astype(int), bins - 1)
    return index


@dataclass
class HistogramBaseline:
    """The fitted HU-histogram statistic (see the module docstring); JSON-serialisable via `as_dict`.

    Attributes:
        mu, sigma: [bins, features] mean and spread of each feature per position bin.
        d_mu, d_sigma: [bins] mean and spread of the training slices' distances per position bin.
        aggregation: series aggregation of slice scores (one of `imaging.AGGREGATIONS`).
        threshold: series score above which a series is flagged, set on validation normals
            (None when no validation series were given).
        train_series, train_slices: how much normal data the fit saw.
    """

    mu: np.ndarray
    sigma: np.ndarray
    d_mu: np.ndarray
    d_sigma: np.ndarray
    aggregation: str
    threshold: float | None = None
    train_series: int = 0
    train_slices: int = 0

    @classmethod
    def fit(
        cls,
        features: Sequence[np.ndarray],
        positions: Sequence[np.ndarray],
        *,
        aggregation: str,
        bins: int = POSITION_BINS,
    ) -> HistogramBaseline:
        """Fit on normal series: `features[i]` [k_i, F] from `hu_histograms`, `positions[i]` [k_i].

        Each position bin pools its own slices with Gaussian weights on the distance between bin
        centres (bandwidth one bin), so a bin with few slices borrows from its neighbours.

        Raises:
            ValueError: no slices, mismatched lengths, or an unknown aggregation.
        """
        if aggregation not in imaging.AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {imaging.AGGREGATIONS}, got {aggregation!r}.")
        if len(features) != len(positions) or not features:
            raise ValueError(
                f"need one position array per feature array and at least one series, got "
                f"{len(features)} and {len(positions)}."
            )
        f = np.concatenate(features)
        b = np.concatenate([position_bin(p, bins) for p in positions])
        if f.shape[0] != b.size:
            raise ValueError(f"{f.shape[0]} feature rows but {b.size} positions.")
        centres = np.arange(bins)
        weights = np.exp(-0.5 * (b[None, :] - centres[:, None]) ** 2)  # [bins, slices]
        weights /= weights.sum(axis=1, keepdims=True)
        mu = weights @ f
        sigma = np.sqrt(np.maximum(weights @ (f * f) - mu * mu, 0.0))
        sigma = np.maximum(sigma, MIN_FEATURE_SIGMA)
        model = cls(mu, sigma, np.zeros(bins), np.ones(bins), aggregation, None, len(features), int(f.shape[0]))
        d = model._distances(f, b)
        d_mu = weights @ d
        d_sigma = np.sqrt(np.maximum(weights @ (d * d) - d_mu * d_mu, 0.0))
        model.d_mu, model.d_sigma = d_mu, np.maximum(d_sigma, 1e-6)
        return model

    def _distances(self, features: np.ndarray, bins: np.ndarray) -> np.ndarray:
        z = (features - self.mu[bins]) / self.sigma[bins]
        distances: np.ndarray = (z * z).mean(axis=1)
        return distances

    def slice_scores(self, features: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Standardised distance of every slice to the normal slices at its position (≈ 0 typical)."""
        b = position_bin(positions, self.mu.shape[0])
        scores: np.ndarray = (self._distances(np.asarray(features, np.float64), b) - self.d_mu[b]) / self.d_sigma[b]
        return scores

    def series_score(self, slice_scores: np.ndarray) -> float:
        return imaging.aggregate_slice_scores(slice_scores, self.aggregation)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "hu-histogram",
            "hu_bin_edges": list(HU_BIN_EDGES),
            "position_bins": int(self.mu.shape[0]),
            "mu": self.mu.round(6).tolist(),
            "sigma": self.sigma.round(6).tolist(),
            "d_mu": self.d_mu.round(6).tolist(),
            "d_sigma": self.d_sigma.round(6).tolist(),
            "aggregation": self.aggregation,
            "threshold": self.threshold,
            "train_series": self.train_series,
            "train_slices": self.train_slices,
        }
