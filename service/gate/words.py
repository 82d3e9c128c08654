"""Findings in words: one sentence a dosimetrist reads per signal, and the slices where it is strongest.

E.g. "metal-density pixels (> 2,000 HU) on slices 10–14: 1,234 (normal ≤ 27.0)": what was seen, where,
the value and the normal range (from the signal's calibration).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from service.gate.signals import DEFAULT_BANDS
from service.gate.statistics import DECREASING, SignalSpec


def slice_run(profile: np.ndarray | None, threshold: float | None) -> tuple[int, int] | None:
    """The run of consecutive slices above `threshold` around the profile's peak; None if the peak is not above."""
    if profile is None or threshold is None or profile.size == 0:
        return None
    peak = int(np.argmax(profile))
    if not profile[peak] > threshold:
        return None
    lo = hi = peak
    while lo > 0 and profile[lo - 1] > threshold:
        lo -= 1
    while hi < profile.size - 1 and profile[hi + 1] > threshold:
        hi += 1
    return lo, hi


def _where(slices: tuple[int, int] | None) -> str:
    if slices is None:
        return ""
    a, b = slices
    return f" on slice {a}" if a == b else f" on slices {a}–{b}"


def _num(x: float, unit: str = "") -> str:
    if not math.isfinite(x):
        return "n/a"
    if unit == "%":
        return f"{100 * x:.0f} %" if abs(x) >= 0.01 or x == 0 else f"{100 * x:.1f} %"
    if abs(x) >= 100:
        s = f"{x:,.0f}"
    elif abs(x) < 0.1:
        s = f"{x:.3f}"
    elif abs(x) >= 10:
        s = f"{x:.1f}"
    else:
        s = f"{x:.2f}"
    return s + (f" {unit}" if unit else "")


def signal_words(
    name: str, value: float, spec: SignalSpec | None, slices: tuple[int, int] | None, extra: Mapping[str, Any]
) -> str:
    """One sentence on a signal in plain words: what was seen, where, the value and the normal range."""
    if not math.isfinite(value):
        return {
            "gan_score": "GAN anomaly score not available (no detector result)",
            "gan_peak": "GAN slice scores not available",
            "tta_dice": "segmentation agreement not measured (no liver found)",
        }.get(name, f"{name.replace('_', ' ')} not measured (no liver found)")
    where = _where(slices)

    def normal(unit: str = "") -> str:
        if spec is None:
            return ""
        if spec.tails == "both" and spec.threshold_low is not None:
            return f"normal {_num(spec.threshold_low)}–{_num(spec.threshold, unit)}"
        sign = "≥" if spec.transform in DECREASING else "≤"
        return f"normal {sign} {_num(spec.threshold, unit)}"

    n = normal()
    if name == "gan_score":
        return f"GAN anomaly score {_num(value)} ({n})"
    if name == "gan_peak":
        return f"GAN anomaly score peaks{where} at {_num(value)} ({n})"
    if name == "entropy":
        return f"the segmenter is unsure around the liver{where} (mean entropy {_num(value)}; {n})"
    if name == "mahalanobis":
        return f"the image looks unlike the normal series to the segmenter{where} (feature distance {_num(value)}; {n})"
    if name == "tta_dice":
        verb = "disagree" if spec is not None and value < spec.threshold else "agree"
        n2 = f"normal ≥ {spec.threshold:.2f}" if spec is not None else ""
        return f"segmentations {verb}{where} (pairwise Dice {value:.2f}; {n2})"
    if name == "liver_volume":
        return f"liver volume {_num(value, 'ml')} ({normal('ml')})"
    if name == "liver_extent":
        return f"the liver spans {_num(value, 'mm')} head to feet ({normal('mm')})"
    if name == "liver_pieces":
        pieces = int(extra.get("pieces", 0))
        return (
            f"the liver probability falls into {pieces} piece{'s' if pieces != 1 else ''} "
            f"({_num(value, '%')} outside the largest; {normal('%')})"
        )
    if name == "metal":
        metal_hu = float(extra.get("metal_hu", DEFAULT_BANDS["metal_hu"]))
        return f"metal-density pixels (> {metal_hu:,.0f} HU){where}: {value:,.0f} ({normal()})"
    if name == "liver_hu":
        band = extra.get("liver_hu_band")
        b = f" ({band[0]:.0f} to {band[1]:.0f} HU)" if band else ""
        return f"liver tissue outside the normal liver's density{b}{where}: {_num(value, '%')} of the liver ({normal('%')})"
    if name == "fluid_border":
        band = extra.get("fluid_hu", DEFAULT_BANDS["fluid_hu"])
        return (
            f"fluid-density tissue ({band[0]:.0f} to {band[1]:.0f} HU) along the liver's border{where}: "
            f"{_num(value, '%')} of its rim ({normal('%')})"
        )
    return f"{name} {_num(value)} ({n})"
