"""How each signal is made comparable: its transform, a robust normal range, Gaussian tail probabilities.

A signal's value x becomes z = (T(x) − center) / scale with T its transform and (center, scale) fitted on
the normal series (`robust_center_scale`); its tail probability is the Gaussian upper tail of z (both
tails for two-sided signals). `SignalSpec` is one signal's calibration as gate.json stores it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special

#: How each signal is made comparable: (transform, tails, smallest scale in transformed units).
#: `log1m` is log(1 − x): a Dice near 1 is usual, so a low Dice is the upper tail.
SIGNAL_MODEL: dict[str, tuple[str, str, float]] = {
    "gan_score": ("log1p", "upper", 0.1),  # heavy-tailed on normals (0.2–50 on the 256² phantom)
    "gan_peak": ("log1p", "upper", 0.1),
    "entropy": ("log", "upper", 0.05),
    "mahalanobis": ("log", "upper", 0.02),
    "tta_dice": ("log1m", "upper", 0.1),
    "liver_volume": ("log", "both", 0.05),
    "liver_extent": ("identity", "both", 5.0),
    "liver_pieces": ("identity", "upper", 0.005),
    "metal": ("log1p", "upper", 1.0),
    "liver_hu": ("identity", "upper", 0.01),
    "fluid_border": ("identity", "upper", 0.01),
}
TRANSFORMS: dict[str, tuple[Callable[[float], float], Callable[[float], float]]] = {
    "identity": (lambda x: x, lambda y: y),
    "log": (lambda x: math.log(max(x, 1e-9)), math.exp),
    "log1p": (lambda x: math.log1p(max(x, 0.0)), math.expm1),
    "log1m": (lambda x: math.log(max(1.0 - x, 1e-4)), lambda y: 1.0 - math.exp(y)),
}
DECREASING = {"log1m"}  # transforms under which a *smaller* value is more unusual
TAILS = ("upper", "both")


@dataclass(frozen=True)
class SignalSpec:
    """One signal's calibration (gate.json `signals.NAME`).

    The tail probability of a value x: z = (T(x) − center) / scale, upper tail (both tails when `tails`
    is "both") of a standard normal. `threshold` (and `threshold_low` for two-sided signals) is where
    it fires inside the fused gate, `threshold_alone` where it would fire as the only signal at the
    gate's false-flag rate; `slice_threshold` marks the slices where its profile is unusual.
    """

    name: str
    transform: str
    tails: str
    center: float
    scale: float
    n: int
    threshold: float
    threshold_low: float | None
    threshold_alone: float
    threshold_alone_low: float | None
    slice_threshold: float | None

    @classmethod
    def from_json(cls, name: str, d: Mapping[str, Any], where: str) -> SignalSpec:
        """Raises ValueError naming the field that is missing or wrong."""
        for key in ("transform", "tails", "center", "scale", "n", "threshold", "threshold_alone"):
            if key not in d:
                raise ValueError(f"{where}: field 'signals.{name}.{key}' missing")
        if d["transform"] not in TRANSFORMS:
            raise ValueError(
                f"{where}: signals.{name}.transform {d['transform']!r}; expected one of {list(TRANSFORMS)}"
            )
        if d["tails"] not in TAILS:
            raise ValueError(f"{where}: signals.{name}.tails {d['tails']!r}; expected one of {list(TAILS)}")
        if not (isinstance(d["scale"], int | float) and d["scale"] > 0):
            raise ValueError(f"{where}: signals.{name}.scale must be a number > 0, got {d['scale']!r}")
        for key in ("center", "threshold", "threshold_alone"):
            if not isinstance(d[key], int | float) or not math.isfinite(d[key]):
                raise ValueError(f"{where}: signals.{name}.{key} must be a finite number, got {d[key]!r}")
        if d["tails"] == "both":
            for key in ("threshold_low", "threshold_alone_low"):
                if not isinstance(d.get(key), int | float):
                    raise ValueError(f"{where}: field 'signals.{name}.{key}' missing (two-sided signal)")

        def opt(key: str) -> float | None:
            return None if d.get(key) is None else float(d[key])

        return cls(
            name=name,
            transform=str(d["transform"]),
            tails=str(d["tails"]),
            center=float(d["center"]),
            scale=float(d["scale"]),
            n=int(d["n"]),
            threshold=float(d["threshold"]),
            threshold_low=opt("threshold_low"),
            threshold_alone=float(d["threshold_alone"]),
            threshold_alone_low=opt("threshold_alone_low"),
            slice_threshold=opt("slice_threshold"),
        )

    def z(self, value: float) -> float:
        return (TRANSFORMS[self.transform][0](value) - self.center) / self.scale

    def tail_probability(self, value: float) -> float:
        """The share of normal series expected at least this unusual (1.0 for NaN: not measured)."""
        if not math.isfinite(value):
            return 1.0
        return tail_probability(self.z(value), self.tails)

    def value_at(self, z: float) -> float:
        return float(TRANSFORMS[self.transform][1](self.center + z * self.scale))


def tail_probability(z: float, tails: str) -> float:
    """Standard-normal upper tail of z (both tails: of |z|, doubled, at most 1)."""
    if tails == "both":
        return min(1.0, float(special.erfc(abs(z) / math.sqrt(2.0))))
    return float(0.5 * special.erfc(z / math.sqrt(2.0)))


def z_for(p: float, tails: str) -> float:
    """The z whose tail probability is p (inverse of `tail_probability`)."""
    q = p / 2 if tails == "both" else p
    return float(-special.ndtri(q))


def robust_center_scale(t: np.ndarray, floor: float) -> tuple[float, float]:
    """(median, scale) of transformed values; the scale is the larger of 1.4826 · MAD and the standard
    deviation (so that a small calibration set with a few wide normals does not get tails that are too
    thin), and at least `floor`."""
    center = float(np.median(t))
    sd = float(np.std(t, ddof=1)) if t.size > 1 else 0.0
    return center, max(1.4826 * float(np.median(np.abs(t - center))), sd, floor)
