"""The gate: a loaded calibration that segments a series, weighs every piece of evidence and decides its route.

`Gate.assess` measures the series (`observe`), turns each calibrated signal into a finding with its tail
probability, fuses them (`fuse`) against the cut in gate.json, and adds the plain rules' findings; the
first reason that fired routes the series to manual contouring.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.db.tables import RouteReason
from service.gate.config import GATE_FORMAT, KIND, read_config, validate_config
from service.gate.findings import DetectorEvidence, Finding, GateDecision
from service.gate.fusion import fuse
from service.gate.observation import Observation, observe, signal_values
from service.gate.reference import Reference
from service.gate.rules import geometry_finding, no_liver_finding, rule_findings
from service.gate.signals import DEFAULT_BANDS, SIGNALS
from service.gate.statistics import SignalSpec
from service.gate.words import signal_words, slice_run

if TYPE_CHECKING:
    from service.dicom_series import CTSeries
    from service.segmentation import Segmentation, Segmenter

log = logging.getLogger(__name__)


@dataclass
class Assessment:
    """The segmenter's result on a series and the gate's decision on it."""

    segmentation: Segmentation
    decision: GateDecision
    extra_segmentations: list[Segmentation] = field(default_factory=list)  # test-time views, for the evidence
    observation: Observation | None = None  # the raw measurements (for calibration and evaluation)


class Gate:
    """A loaded gate: its calibration (gate.json) and the fusion rule.

    `Gate.rules_only()` is the gate before any calibration: the detector's own flag, no liver found,
    and the geometry findings decide (the behaviour before issue 15): one segmentation, no views, no
    off-target rules. A calibrated gate (`Gate.load`) adds the test-time views, every signal, the fusion
    and the off-target rules. A series that cannot be read never reaches the gate (the pipeline routes
    it `unreadable`).
    """

    def __init__(self, config: dict[str, Any], folder: Path | None = None, reference: Reference | None = None) -> None:
        self.config = config
        self.folder = folder
        self.version = str(config.get("version", "rules-only"))
        self.calibrated = bool(config.get("signals"))
        self.specs: dict[str, SignalSpec] = (
            validate_config(config, str(folder or "gate.json")) if self.calibrated else {}
        )
        self.reference = reference
        self.rules: dict[str, Any] = config.get("rules", {})
        self.bands: dict[str, Any] = dict(DEFAULT_BANDS, **config.get("bands", {}))
        self.views: tuple[str, ...] = tuple(config.get("views", ()))
        fusion = config.get("fusion", {})
        self.fused_threshold: float | None = float(fusion["threshold"]) if self.calibrated else None
        self._versions_checked = False

    @classmethod
    def rules_only(cls) -> Gate:
        return cls({"format": GATE_FORMAT, "kind": KIND, "version": "rules-only", "signals": {}})

    @classmethod
    def load(cls, folder: Path | str) -> Gate:
        """The gate in `folder` (gate.json and the files it names).

        Raises:
            FileNotFoundError: no gate.json in `folder`, or the reference file it names is missing.
            ValueError: a field is missing or wrong, the reference file's SHA-256 differs from gate.json's,
                or `version` is not the hash of the content (the message names the field).
        """
        config, reference = read_config(Path(folder))
        return cls(config, Path(folder), reference)

    def assess(
        self,
        *,
        series: CTSeries,
        segmenter: Segmenter,
        detector: DetectorEvidence | None,
        geometry_findings: Sequence[dict[str, Any]] = (),
        min_liver_ml: float = 50.0,
    ) -> Assessment:
        """Segment `series`, measure the evidence and decide its route.

        Order of the reason when several fire: not an abdominal CT, no liver, liver partly covered,
        geometry, the detector's own flag (rules-only gate), the fused evidence (`RouteReason.GATE`).
        """
        if not self.calibrated:
            return self._assess_rules_only(series, segmenter, detector, geometry_findings, min_liver_ml)
        self._check_versions(segmenter, detector)
        segmentation, obs, _ = observe(
            series=series, segmenter=segmenter, detector=detector, views=self.views, bands=self.bands
        )
        findings, p_values = self.signal_findings(obs)
        fused = fuse(p_values)
        assert self.fused_threshold is not None
        fused_fired = fused > self.fused_threshold
        reasons: list[RouteReason] = []
        rule_findings = self.rule_findings(obs, segmentation, detector, geometry_findings, min_liver_ml, reasons)
        if fused_fired:
            reasons.append(RouteReason.GATE)
        reason = reasons[0] if reasons else None
        decision = GateDecision(
            reason is not None, reason, tuple(findings + rule_findings), fused, self.fused_threshold, self.version
        )
        return Assessment(segmentation=segmentation, decision=decision, observation=obs)

    def _check_versions(self, segmenter: Segmenter, detector: DetectorEvidence | None) -> None:
        """Warn (once per gate) when the models differ from those the gate was calibrated with."""
        if self._versions_checked:
            return
        self._versions_checked = True
        calibrated_seg = (self.config.get("segmenter") or {}).get("version")
        calibrated_det = (self.config.get("detector") or {}).get("version")
        if calibrated_seg and getattr(segmenter, "version", calibrated_seg) != calibrated_seg:
            log.warning(
                "gate %s was calibrated with segmenter %s, not %s: recalibrate (`gatekeeper calibrate gate`)",
                self.version,
                calibrated_seg,
                segmenter.version,
            )
        if calibrated_det and detector is not None and detector.model_version not in ("", calibrated_det):
            log.warning(
                "gate %s was calibrated with detector %s, not %s: recalibrate (`gatekeeper calibrate gate`)",
                self.version,
                calibrated_det,
                detector.model_version,
            )

    def signal_findings(self, obs: Observation) -> tuple[list[Finding], list[float]]:
        """A finding per calibrated signal and its tail probability (fired: below the fused cut)."""
        assert self.fused_threshold is not None
        p_cut = 10.0**-self.fused_threshold
        values = signal_values(obs, self.reference)
        extra = {
            "pieces": obs.liver_pieces,
            "metal_hu": self.bands["metal_hu"],
            "liver_hu_band": self.bands.get("liver_hu"),
            "fluid_hu": self.bands["fluid_hu"],
        }
        findings, p_values = [], []
        for name in SIGNALS:
            spec = self.specs.get(name)
            if spec is None:
                continue
            value, profile = values[name]
            p = spec.tail_probability(value)
            fired = p < p_cut
            p_values.append(p)
            slices = slice_run(profile, spec.slice_threshold)
            threshold = spec.threshold
            if spec.tails == "both" and spec.threshold_low is not None and spec.z(value) < 0:
                threshold = spec.threshold_low
            findings.append(
                Finding(
                    name,
                    value,
                    threshold,
                    fired,
                    slices,
                    signal_words(name, value, spec, slices, extra),
                    p if math.isfinite(value) else float("nan"),
                )
            )
        return findings, p_values

    def rule_findings(
        self,
        obs: Observation,
        segmentation: Segmentation,
        detector: DetectorEvidence | None,
        geometry_findings: Sequence[dict[str, Any]],
        min_liver_ml: float,
        reasons: list[RouteReason],
    ) -> list[Finding]:
        """The plain rules (`service.gate.rules.rule_findings` with this gate's `rules`); appends reasons."""
        return rule_findings(self.rules, obs, segmentation, detector, geometry_findings, min_liver_ml, reasons)

    def _assess_rules_only(
        self,
        series: CTSeries,
        segmenter: Segmenter,
        detector: DetectorEvidence | None,
        geometry_findings: Sequence[dict[str, Any]],
        min_liver_ml: float,
    ) -> Assessment:
        """The behaviour before issue 15: geometry, the detector's flag, no liver."""
        segmentation = segmenter.segment(series)
        findings: list[Finding] = []
        reason: RouteReason | None = None
        if geometry_findings:
            findings.append(geometry_finding(geometry_findings))
            reason = reason or RouteReason.GEOMETRY
        if detector is not None:
            flagged = detector.score > detector.threshold
            findings.append(
                Finding(
                    "gan",
                    detector.score,
                    detector.threshold,
                    flagged,
                    None,
                    f"GAN anomaly score {detector.score:.2f} (normal ≤ {detector.threshold:.2f})",
                )
            )
            if flagged:
                reason = reason or RouteReason.ANOMALY
        missing = no_liver_finding(segmentation, min_liver_ml)
        if missing is not None:
            findings.append(missing)
            reason = reason or RouteReason.NO_LIVER
        decision = GateDecision(reason is not None, reason, tuple(findings), None, None, self.version)
        return Assessment(segmentation=segmentation, decision=decision)
