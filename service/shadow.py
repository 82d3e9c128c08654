"""Shadow mode: the gate runs on real traffic before go-live, and the dosimetrists' answers measure it.

With `Settings.mode` "shadow" the pipeline (service/pipeline/) does everything it does live —
score, segment every readable series, let the gate decide, write the SEG / RT Structure Set — but
sends nothing to the PACS or the forward node (`service.dicom_send` refuses every destination), so
the department keeps contouring as before:

- a series the gate lets through ends `withheld` (its contour kept under `results/`); a share
  `Settings.shadow_review_share` of them, chosen by `selected_for_shadow_review` (a hash of the
  Series Instance UID, so the same series is always chosen or not), also gets a worklist item of
  reason `shadow_review`, on which a dosimetrist answers "is the auto contour acceptable? yes / no";
- a series the gate stops goes to the worklist exactly as in live mode, with the segmenter's
  draft contour (stored, never sent) and the gate's findings, which the series page shows, so that
  its reviewer can answer the same question ("would the auto contour have been acceptable?") with
  the contour in front of them.

The answers are `ContourFeedback` rows (service/feedback.py). `shadow_report` puts the newest
answer of each series version against the gate's decision (`Series.route`): the agreement table,
and the gate's sensitivity and specificity for "not acceptable" with percentile-bootstrap 95 %
CIs. `gatekeeper report shadow [--json]` prints it (service/commands/shadow.py).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from service.db.tables import FeedbackVerdict, Route, RouteReason
from service.feedback import feedback_labels, latest_per_series

#: The question a shadow review asks, as the worklist shows it.
SHADOW_REVIEW_QUESTION = "Shadow review: is the auto contour acceptable?"
#: The positive class of the gate's sensitivity and specificity.
POSITIVE = "auto contour not acceptable (the reviewer answered no)"


def selected_for_shadow_review(series_instance_uid: str, share: float) -> bool:
    """Whether shadow mode puts this auto-routed series on the worklist for a review.

    Deterministic: the first 8 bytes of the SHA-256 of the Series Instance UID, as a fraction of
    2⁶⁴, below `share`. Every version of a series gets the same answer, and raising the share
    keeps every series chosen before.

    Raises:
        ValueError: `share` is not between 0 and 1.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"shadow review share {share!r}: expected a number from 0 to 1")
    digest = hashlib.sha256(series_instance_uid.encode("ascii", "replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < share


@dataclass(frozen=True)
class Estimate:
    """A proportion and its percentile-bootstrap 95 % interval; None where undefined (no cases)."""

    value: float | None
    ci95: tuple[float, float] | None
    numerator: int
    denominator: int


@dataclass(frozen=True)
class AgreementTable:
    """The gate's decision against the reviewer's answer, counted over series versions.

    `auto_yes`: the gate sent it to auto-segmentation and the reviewer found the auto contour
    acceptable (agreement); `auto_no`: auto, not acceptable (the gate missed it); `manual_yes`:
    the gate sent it to the worklist but the auto contour would have been acceptable (a needless
    stop); `manual_no`: worklist, not acceptable (the gate was right). "Not acceptable" is the
    positive class: sensitivity = manual_no / (manual_no + auto_no), specificity = auto_yes /
    (auto_yes + manual_yes), agreement = (auto_yes + manual_no) / n.
    """

    auto_yes: int
    auto_no: int
    manual_yes: int
    manual_no: int
    agreement: Estimate
    sensitivity: Estimate
    specificity: Estimate
    resamples: int
    seed: int

    @property
    def n(self) -> int:
        return self.auto_yes + self.auto_no + self.manual_yes + self.manual_no


def _proportion(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator per resample, NaN where the denominator is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def _estimate(numerator: int, denominator: int, resampled: np.ndarray) -> Estimate:
    finite = resampled[np.isfinite(resampled)]
    if denominator == 0:
        return Estimate(value=None, ci95=None, numerator=numerator, denominator=denominator)
    low, high = np.percentile(finite, [2.5, 97.5]) if finite.size else (np.nan, np.nan)
    ci = (round(float(low), 4), round(float(high), 4)) if finite.size else None
    return Estimate(value=round(numerator / denominator, 4), ci95=ci, numerator=numerator, denominator=denominator)


def agreement_table(
    gate_manual: Sequence[bool], not_acceptable: Sequence[bool], *, resamples: int = 2000, seed: int = 0
) -> AgreementTable:
    """The agreement table of paired decisions, with percentile-bootstrap 95 % CIs.

    `gate_manual[i]`: the gate sent case i to the worklist; `not_acceptable[i]`: the reviewer
    answered that its auto contour is not acceptable. The bootstrap resamples the cases (pairs)
    with replacement `resamples` times from `numpy.random.default_rng(seed)`; a resample in which
    a proportion's denominator is 0 does not count towards that proportion's interval.

    Raises:
        ValueError: the two sequences differ in length, or `resamples` is below 1.
    """
    gate = np.asarray(gate_manual, dtype=bool)
    truth = np.asarray(not_acceptable, dtype=bool)
    if gate.shape != truth.shape or gate.ndim != 1:
        raise ValueError(f"gate_manual has {gate.size} cases and not_acceptable {truth.size}; expected the same")
    if resamples < 1:
        raise ValueError(f"resamples {resamples}: expected at least 1")
    n = int(gate.size)
    tp, fn = int(np.sum(gate & truth)), int(np.sum(~gate & truth))
    fp, tn = int(np.sum(gate & ~truth)), int(np.sum(~gate & ~truth))
    agree, sens, spec = (np.full(resamples, np.nan) for _ in range(3))
    if n:
        rng = np.random.default_rng(seed)
        chunk = max(1, 2_000_000 // n)  # bound the memory of one (resamples × n) index block
        for start in range(0, resamples, chunk):
            stop = min(resamples, start + chunk)
            index = rng.integers(0, n, size=(stop - start, n))
            g, t = gate[index], truth[index]
            b_tp, b_fn = np.sum(g & t, axis=1), np.sum(~g & t, axis=1)
            b_fp, b_tn = np.sum(g & ~t, axis=1), np.sum(~g & ~t, axis=1)
            agree[start:stop] = (b_tp + b_tn) / n
            sens[start:stop] = _proportion(b_tp, b_tp + b_fn)
            spec[start:stop] = _proportion(b_tn, b_tn + b_fp)
    return AgreementTable(
        auto_yes=tn,
        auto_no=fn,
        manual_yes=fp,
        manual_no=tp,
        agreement=_estimate(tp + tn, n, agree),
        sensitivity=_estimate(tp, tp + fn, sens),
        specificity=_estimate(tn, tn + fp, spec),
        resamples=resamples,
        seed=seed,
    )


@dataclass(frozen=True)
class ShadowReport:
    """The agreement table over the recorded answers, with what was left out and where answers came from.

    `not_applicable`: series versions whose newest answer is "not applicable" (not counted);
    `unrouted`: answered but never routed (not counted); `manual_by_reason`: the worklist row's
    cases by route reason; `shadow_reviews`: answers given on a shadow-review worklist item.
    """

    table: AgreementTable
    not_applicable: int
    unrouted: int
    manual_by_reason: dict[str, int] = field(default_factory=dict)
    shadow_reviews: int = 0
    detector_versions: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready values."""
        table = self.table
        return {
            "positive": POSITIVE,
            "counts": {
                "auto_yes": table.auto_yes,
                "auto_no": table.auto_no,
                "manual_yes": table.manual_yes,
                "manual_no": table.manual_no,
            },
            "n": table.n,
            "agreement": _estimate_json(table.agreement),
            "sensitivity": _estimate_json(table.sensitivity),
            "specificity": _estimate_json(table.specificity),
            "bootstrap": {"resamples": table.resamples, "seed": table.seed},
            "not_applicable": self.not_applicable,
            "unrouted": self.unrouted,
            "manual_by_reason": dict(sorted(self.manual_by_reason.items())),
            "shadow_reviews": self.shadow_reviews,
            "detector_versions": self.detector_versions,
        }


def _estimate_json(estimate: Estimate) -> dict[str, Any]:
    values = asdict(estimate)
    values["ci95"] = list(estimate.ci95) if estimate.ci95 is not None else None
    return values


def shadow_report(*, session: Session, resamples: int = 2000, seed: int = 0) -> ShadowReport:
    """The gate (`Series.route`) against the newest answer of each series version, over every recorded answer.

    The worklist row's answers come from feedback on worklisted series (their reviewer sees the
    segmenter's draft when there is one); the auto row's from shadow reviews and
    any other feedback on auto-routed series.

    Raises:
        ValueError: `resamples` is below 1.
    """
    labels = latest_per_series(feedback_labels(session=session))
    gate_manual: list[bool] = []
    not_acceptable: list[bool] = []
    reasons: Counter[str] = Counter()
    not_applicable = unrouted = shadow_reviews = 0
    versions: set[str] = set()
    for label in labels:
        if label.verdict == FeedbackVerdict.NOT_APPLICABLE:
            not_applicable += 1
            continue
        if label.route not in (Route.AUTO, Route.WORKLIST):
            unrouted += 1
            continue
        manual = label.route == Route.WORKLIST
        gate_manual.append(manual)
        not_acceptable.append(label.verdict == FeedbackVerdict.NO)
        if manual:
            reasons[label.route_reason or "unknown"] += 1
        if label.worklist_reason == RouteReason.SHADOW_REVIEW:
            shadow_reviews += 1
        if label.detector_model_version:
            versions.add(label.detector_model_version)
    return ShadowReport(
        table=agreement_table(gate_manual, not_acceptable, resamples=resamples, seed=seed),
        not_applicable=not_applicable,
        unrouted=unrouted,
        manual_by_reason=dict(reasons),
        shadow_reviews=shadow_reviews,
        detector_versions=sorted(versions),
    )
