"""References fitted on normals: the Mahalanobis mean and precision, and the liver's HU band.

They are stored in the gate's reference .npz (mean, precision) and gate.json (`bands.liver_hu`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.gate.signals import HU_BINS


@dataclass
class Reference:
    """What signals compare against, fitted on the calibration normals (stored in the reference .npz)."""

    mahalanobis_mean: np.ndarray
    mahalanobis_precision: np.ndarray
    liver_hu_band: tuple[float, float]

    def mahalanobis(self, features: np.ndarray) -> np.ndarray:
        d = features.astype(np.float64) - self.mahalanobis_mean
        out: np.ndarray = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, self.mahalanobis_precision, d), 0.0))
        return out


def fit_mahalanobis(features: np.ndarray, shrink: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(mean, precision) of features [n, F] with the covariance shrunk towards its mean variance.

    Raises:
        ValueError: fewer than 2 rows.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [n >= 2, F], got {features.shape}.")
    f = features.astype(np.float64)
    mean = f.mean(0)
    cov = np.cov(f, rowvar=False)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    return mean, np.linalg.inv(cov)


def hu_band(hist: np.ndarray, low_q: float = 0.005, high_q: float = 0.995) -> tuple[float, float]:
    """The HU band holding the central 99 % of the voxels of a histogram over `HU_BINS` (+ under/overflow)."""
    total = hist.sum()
    if total == 0:
        raise ValueError("liver HU histogram is empty: no normal series had a liver")
    cum = np.cumsum(hist) / total
    edges = np.concatenate([[HU_BINS[0] - 5.0], HU_BINS])  # left edge of each bin (underflow: below −300)
    lo = float(edges[int(np.searchsorted(cum, low_q))])
    hi = float(edges[min(int(np.searchsorted(cum, high_q)) + 1, len(edges) - 1)])
    return lo, hi


def liver_hu_outside(hist: np.ndarray | None, band: tuple[float, float]) -> tuple[float, np.ndarray | None]:
    """(share of eroded-liver voxels outside `band`, per-slice share) from per-slice histograms."""
    if hist is None or hist.sum() == 0:
        return float("nan"), None
    edges = np.concatenate([[-np.inf], HU_BINS])  # bin b holds [edges[b], edges[b+1])
    right = np.concatenate([HU_BINS, [np.inf]])
    inside = (edges >= band[0]) & (right <= band[1])
    per = hist.sum(axis=1)
    out = (hist[:, ~inside]).sum(axis=1)
    profile = np.where(per > 0, out / np.maximum(per, 1), 0.0)
    return float(out.sum() / per.sum()), profile
