"""Fusing the evidence and the cut: the smallest tail probability across signals, and where it fires.

The fused statistic is −log10 of the smallest tail probability. The cut is Bonferroni's
−log10(false_flag_rate / number of signals), raised to the empirical (1 − false_flag_rate) quantile of the
leave-one-out fused statistic on the calibration normals when that is higher.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from service.gate.statistics import SIGNAL_MODEL, robust_center_scale, tail_probability


def fuse(p_values: Sequence[float]) -> float:
    """The fused statistic: −log10 of the smallest tail probability (0 when nothing was measured)."""
    finite = [p for p in p_values if math.isfinite(p)]
    if not finite:
        return 0.0
    return float(-math.log10(max(min(finite), 1e-300)))


def leave_one_out_fused(transformed: Mapping[str, np.ndarray], count: int) -> list[float]:
    """The fused statistic of each of `count` normals, its signals' centres and scales fitted without it.

    `transformed` holds each calibrated signal's transformed values on the normals (NaN: not measured),
    in `SIGNALS` order.
    """
    loo_fused = []
    for i in range(count):
        ps = []
        for name, t in transformed.items():
            if not np.isfinite(t[i]):
                continue
            rest = np.delete(t, i)
            rest = rest[np.isfinite(rest)]
            c, s = robust_center_scale(rest, SIGNAL_MODEL[name][2])
            ps.append(tail_probability((t[i] - c) / s, SIGNAL_MODEL[name][1]))
        loo_fused.append(fuse(ps))
    return loo_fused


def fused_cut(loo_fused: Sequence[float], n_signals: int, false_flag_rate: float) -> tuple[float, float, float]:
    """(Bonferroni's cut, the empirical cut, the cut: the larger) for `n_signals` at `false_flag_rate`.

    The empirical cut is the (1 − false_flag_rate) quantile of the normals' leave-one-out fused statistics.
    """
    bonferroni = -math.log10(false_flag_rate / n_signals)
    empirical = float(np.quantile(loo_fused, 1.0 - false_flag_rate))
    return bonferroni, empirical, max(bonferroni, empirical)
