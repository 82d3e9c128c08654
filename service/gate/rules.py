"""The plain rules: off-target series (not an abdominal CT, no liver, a liver cut by the field of view),
irregular geometry from ingest, and the detector's own flag — each its own `RouteReason`.

Their thresholds are plain numbers in gate.json `rules` (not fitted; `DEFAULT_RULES` when calibrating).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from service.db.tables import RouteReason
from service.gate.findings import DetectorEvidence, Finding
from service.gate.observation import Observation

if TYPE_CHECKING:
    from service.segmentation import Segmentation

DEFAULT_RULES: dict[str, Any] = {
    "detector_flag": False,  # the GAN score is one of the fused signals; its own flag is not a rule
    "not_abdomen": {"min_body_area_cm2": 200.0, "max_bone_fraction": 0.15},
    "liver_partial": {"max_end_ratio": 0.3},
}


def rule_findings(
    rules: Mapping[str, Any],
    obs: Observation,
    segmentation: Segmentation,
    detector: DetectorEvidence | None,
    geometry_findings: Sequence[dict[str, Any]],
    min_liver_ml: float,
    reasons: list[RouteReason],
) -> list[Finding]:
    """The plain rules (off-target, geometry, the detector's flag when gate.json asks); appends reasons.

    `rules` is gate.json's `rules` (a rule it lacks takes its value from `DEFAULT_RULES`). The reasons are
    appended in the order the rules are checked: not an abdominal CT, no liver, liver partly covered,
    geometry, the detector's flag.
    """
    out: list[Finding] = []
    rule = rules.get("not_abdomen", DEFAULT_RULES["not_abdomen"])
    min_area, max_bone = float(rule["min_body_area_cm2"]), float(rule["max_bone_fraction"])
    small, bony = obs.body_area_cm2 < min_area, obs.bone_fraction > max_bone
    if small or bony:
        why = (
            f"body cross-section {obs.body_area_cm2:.0f} cm² (an abdomen ≥ {min_area:.0f} cm²)"
            if small
            else f"bone is {100 * obs.bone_fraction:.0f} % of the body (an abdomen ≤ {100 * max_bone:.0f} %)"
        )
        out.append(Finding("not_abdomen", obs.body_area_cm2, min_area, True, None, f"not an abdominal CT: {why}"))
        reasons.append(RouteReason.NOT_ABDOMEN)
    missing = no_liver_finding(segmentation, min_liver_ml)
    if missing is not None:
        out.append(missing)
        reasons.append(RouteReason.NO_LIVER)
    else:
        max_end = float(rules.get("liver_partial", DEFAULT_RULES["liver_partial"])["max_end_ratio"])
        top, bottom = obs.end_ratio
        if max(top, bottom) > max_end:
            first = top >= bottom
            k = obs.num_slices - 1
            out.append(
                Finding(
                    "liver_partial",
                    max(top, bottom),
                    max_end,
                    True,
                    (0, 0) if first else (k, k),
                    f"the liver is only partly covered: cut by the {'first' if first else 'last'} slice, "
                    f"which holds {100 * max(top, bottom):.0f} % of its largest cross-section "
                    f"(a complete liver ≤ {100 * max_end:.0f} %)",
                )
            )
            reasons.append(RouteReason.LIVER_PARTIAL)
    if geometry_findings:
        out.append(geometry_finding(geometry_findings))
        reasons.append(RouteReason.GEOMETRY)
    if detector is not None and rules.get("detector_flag", False) and detector.score > detector.threshold:
        out.append(
            Finding(
                "gan",
                detector.score,
                detector.threshold,
                True,
                None,
                f"GAN anomaly score {detector.score:.2f} (the detector's own flag: normal ≤ {detector.threshold:.2f})",
            )
        )
        reasons.append(RouteReason.ANOMALY)
    return out


def geometry_finding(geometry_findings: Sequence[dict[str, Any]]) -> Finding:
    """The rule finding for the ingest's geometry findings (their codes in words)."""
    codes = ", ".join(str(f.get("code")) for f in geometry_findings)
    return Finding(
        "geometry",
        float(len(geometry_findings)),
        float("nan"),
        True,
        None,
        f"the series' geometry is irregular ({codes})",
    )


def no_liver_finding(segmentation: Segmentation, min_liver_ml: float) -> Finding | None:
    """The `no_liver` rule's finding when the segmenter found less than `min_liver_ml` of liver, else None."""
    if segmentation.mask.any() and segmentation.liver_volume_ml >= min_liver_ml:
        return None
    return Finding(
        "no_liver",
        segmentation.liver_volume_ml,
        min_liver_ml,
        True,
        None,
        f"no liver in the field of view ({segmentation.liver_volume_ml:.0f} ml found)",
    )
