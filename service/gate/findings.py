"""What the pipeline and the web app read: the detector's evidence, one finding, the gate's decision.

A `Finding` is one piece of evidence on one series (a calibrated signal or a plain rule) with its value,
threshold, slices and words; a `GateDecision` is the route and every finding behind it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from service.db.tables import RouteReason


@dataclass(frozen=True)
class DetectorEvidence:
    """What the GAN detector said about the series (from its `SeriesScore`)."""

    score: float
    threshold: float
    slice_scores: tuple[float, ...] = ()  # per slice, in the series' slice order (head → feet)
    model_version: str = ""


@dataclass(frozen=True)
class Finding:
    """One piece of evidence on one series.

    Attributes:
        signal: its name (a key of `SIGNALS`, or a rule's name such as "geometry", "no_liver").
        value: the measured value (units in `words`).
        threshold: the value above which it fires (calibrated on normals), NaN for plain rules; for a
            signal where a low value is unusual (`tta_dice`) or both tails are (`liver_volume`), the value
            beyond which it fires on the side the value lies (see `words`).
        fired: whether it sends the series to manual contouring on its own or through the fusion.
        slices: first and last slice index (0-based, head → feet) where it is strongest; None if global.
        words: one sentence a dosimetrist reads, e.g. "segmentations disagree on slices 40–52
            (pairwise Dice 0.81; normal ≥ 0.93)".
        p_value: the signal's tail probability among normal series (NaN for rules and unmeasured signals).
    """

    signal: str
    value: float
    threshold: float
    fired: bool
    slices: tuple[int, int] | None
    words: str
    p_value: float = float("nan")

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["value"] = _finite_or_none(self.value)
        out["threshold"] = _finite_or_none(self.threshold)
        out["p_value"] = _finite_or_none(self.p_value, digits=12)
        out["slices"] = list(self.slices) if self.slices is not None else None
        return out


@dataclass(frozen=True)
class GateDecision:
    """Where the series goes and why.

    Attributes:
        manual: True → the worklist (the segmentation is kept as a draft, not sent).
        reason: the route reason when manual (the first rule or signal that fired), else None.
        findings: every signal computed, fired or not, in `SIGNALS` order then the rules.
        fused: the fused statistic (see gate.json `fusion`); None for a rules-only gate.
        fused_threshold: its threshold; None for a rules-only gate.
        gate_version: the gate.json version ("rules-only" without one).
    """

    manual: bool
    reason: RouteReason | None
    findings: tuple[Finding, ...]
    fused: float | None
    fused_threshold: float | None
    gate_version: str

    def fired(self) -> list[Finding]:
        return [f for f in self.findings if f.fired]

    def as_json(self) -> dict[str, Any]:
        return {
            "manual": self.manual,
            "reason": self.reason.value if self.reason is not None else None,
            "fused": _finite_or_none(self.fused),
            "fused_threshold": _finite_or_none(self.fused_threshold),
            "gate_version": self.gate_version,
            "findings": [f.as_json() for f in self.findings],
        }


def _finite_or_none(x: float | None, digits: int = 6) -> float | None:
    if x is None or not np.isfinite(x):
        return None
    return round(float(x), digits)
