"""Calibration of the slice score on validation normals: term normalisation, series aggregation, threshold.

Only normal series are used. The series aggregation is chosen with *proxy* anomalies — smooth
intensity blobs pasted into a few consecutive slices of the validation normals — never with the
anomaly types the evaluation measures; the threshold is set on the clean validation series alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.detector.data import SeriesData
from models.detector.metrics import auroc, threshold_at_false_flag_rate  # noqa: F401 — re-exported
from models.detector.stylegan2.networks import Scorer
from service import imaging

log = logging.getLogger(__name__)


@torch.no_grad()
def slice_terms(
    scorer: Scorer, series: list[SeriesData], positions: list[np.ndarray], device: torch.device, batch: int = 64
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Unnormalised (residual, feature) terms for every slice of every series."""
    out = []
    for s, pos in zip(series, positions):
        r_all, f_all = [], []
        for i in range(0, s.num_slices, batch):
            x = torch.from_numpy(s.images[i : i + batch].astype(np.float32)).to(device)[:, None]
            m = torch.from_numpy(s.masks[i : i + batch].astype(np.float32)).to(device)[:, None]
            p = torch.from_numpy(np.asarray(pos[i : i + batch], np.float32)).to(device)
            r, f, _ = scorer.terms(x, p, m)
            r_all.append(r.cpu().numpy())
            f_all.append(f.cpu().numpy())
        out.append((np.concatenate(r_all), np.concatenate(f_all)))
    return out


def add_proxy_anomaly(s: SeriesData, rng: np.random.Generator) -> SeriesData:
    """A copy of `s` with a smooth ±(60–150 HU) blob in 3–8 consecutive slices inside the body."""
    images = s.images.astype(np.float32).copy()
    k, size, _ = images.shape
    length = int(min(k, rng.integers(3, 9)))
    start = int(rng.integers(0, k - length + 1))
    body = s.masks[start : start + length].any(axis=0)
    ys, xs = np.nonzero(body)
    if ys.size == 0:
        ys, xs = np.array([size // 2]), np.array([size // 2])
    j = int(rng.integers(0, ys.size))
    radius = size * rng.uniform(0.04, 0.10)
    amp = rng.choice([-1.0, 1.0]) * rng.uniform(60.0, 150.0) / imaging.ABDOMEN_WINDOW.width * 2.0
    yy, xx = np.mgrid[0:size, 0:size]
    blob = np.exp(-((yy - ys[j]) ** 2 + (xx - xs[j]) ** 2) / (2 * radius**2)).astype(np.float32)
    for t in range(start, start + length):
        images[t] = np.clip(images[t] + amp * blob * s.masks[t], -1.0, 1.0)
    return SeriesData(
        s.series_instance_uid + ".proxy",
        s.sop_instance_uids,
        images.astype(np.float16),
        s.masks,
        s.locations_mm,
        s.true_positions,
        s.folder,
    )


def position_normalisation(
    positions: np.ndarray, residual: np.ndarray, feature: np.ndarray, *, grid_size: int = 10, by_position: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """μ and σ of both score terms as functions of slice position, from validation normal slices.

    Returns (grid [K], table [4, K]: μ_r, σ_r, μ_f, σ_f). Each grid point takes a Gaussian-weighted
    (bandwidth = grid step) local linear fit of the slices around it and the spread about it, so every
    point has support and the ends are not biased; σ is floored at 10 % of the global σ.
    `by_position=False` (or too narrow a range of positions) gives the global normalisation as a
    constant table.
    """
    p = np.asarray(positions, np.float64)
    terms = [np.asarray(residual, np.float64), np.asarray(feature, np.float64)]
    global_stats = [(t.mean(), t.std() + 1e-12) for t in terms]
    lo, hi = np.percentile(p, [1, 99]) if p.size else (0.0, 1.0)
    if not by_position or hi - lo < 1e-3 or p.size < 2 * grid_size:
        (mr, sr), (mf, sf) = global_stats
        return np.array([0.0, 1.0]), np.array([[mr, mr], [sr, sr], [mf, mf], [sf, sf]])
    grid = np.linspace(lo, hi, grid_size)
    step = grid[1] - grid[0]
    table = np.zeros((4, grid_size))
    for k, c in enumerate(grid):
        w = np.exp(-0.5 * ((p - c) / step) ** 2)
        w /= w.sum()
        x = np.stack([np.ones_like(p), p - c], axis=1)
        xtw = x.T * w
        for j, (t, (_, g_sigma)) in enumerate(zip(terms, global_stats)):
            # Local linear fit (no bias at the ends of the range, unlike a local mean).
            beta = np.linalg.lstsq(xtw @ x + 1e-9 * np.eye(2), xtw @ t, rcond=None)[0]
            mu = float(beta[0])
            sigma = float(np.sqrt((w * (t - x @ beta) ** 2).sum()))
            table[2 * j, k], table[2 * j + 1, k] = mu, max(sigma, 0.1 * g_sigma)
    return grid, table


@dataclass
class Calibration:
    grid: list[float]
    table: list[list[float]]  # μ_r, σ_r, μ_f, σ_f per grid position (validation normal slices)
    aggregation: str
    aggregation_auroc: dict[str, float]  # proxy-anomaly series AUROC per aggregation (validation)
    threshold: float
    false_flag_rate: float
    validation_series_scores: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {
            "normalisation": {
                "position_grid": self.grid,
                "mu_residual": self.table[0],
                "sigma_residual": self.table[1],
                "mu_feature": self.table[2],
                "sigma_feature": self.table[3],
            },
            "aggregation": self.aggregation,
            "aggregation_proxy_auroc": self.aggregation_auroc,
            "threshold": self.threshold,
            "target_false_flag_rate": self.false_flag_rate,
            "validation_series_scores": self.validation_series_scores,
        }


def calibrate(
    scorer: Scorer,
    validation: list[SeriesData],
    positions: list[np.ndarray],
    device: torch.device,
    *,
    kappa: float,
    false_flag_rate: float = 0.05,
    seed: int = 0,
    by_position: bool = True,
) -> Calibration:
    """Normalise the two score terms (by position unless `by_position` is False), choose the series
    aggregation and set the threshold — all on validation normals."""
    terms = slice_terms(scorer, validation, positions, device)
    grid, table = position_normalisation(
        np.concatenate(positions),
        np.concatenate([t[0] for t in terms]),
        np.concatenate([t[1] for t in terms]),
        by_position=by_position,
    )
    scorer.set_position_normalisation(grid.tolist(), table.tolist())

    def slice_scores(tt: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        out = []
        for (a, b), p in zip(tt, positions):
            st = [np.interp(p, grid, row) for row in table]
            out.append((a - st[0]) / st[1] + kappa * (b - st[2]) / st[3])
        return out

    clean = slice_scores(terms)
    rng = np.random.default_rng([seed, 0xCA1])
    proxies = [add_proxy_anomaly(s, rng) for s in validation]
    proxy = slice_scores(slice_terms(scorer, proxies, positions, device))
    aurocs = {}
    for method in imaging.AGGREGATIONS:
        neg = np.array([imaging.aggregate_slice_scores(s, method) for s in clean])
        pos = np.array([imaging.aggregate_slice_scores(s, method) for s in proxy])
        aurocs[method] = round(auroc(neg, pos), 4)
    best = max(imaging.AGGREGATIONS, key=lambda m: (aurocs[m], -imaging.AGGREGATIONS.index(m)))
    series_scores = [imaging.aggregate_slice_scores(s, best) for s in clean]
    threshold = threshold_at_false_flag_rate(np.array(series_scores), false_flag_rate)
    log.info(
        "calibration: %s normalisation over %d grid points, aggregation %s (proxy AUROC %s), threshold %.4g",
        "position-dependent" if by_position and grid.size > 2 else "global",
        grid.size,
        best,
        aurocs,
        threshold,
    )
    return Calibration(
        [float(v) for v in grid],
        [[float(v) for v in row] for row in table],
        best,
        aurocs,
        threshold,
        false_flag_rate,
        [round(float(v), 5) for v in series_scores],
    )
