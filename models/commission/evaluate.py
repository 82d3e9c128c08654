"""Stage 4 — the held-out evaluation: false flags of normals, Dice against the site's contours, recall on
known-abnormal series, and the fine-tuned segmenter against the active one.

Only series of the `held_out` role (and the `--abnormal` series) are reported on, and before anything
runs every model used is asked which series it was trained or calibrated on
(`models.commission.leakage`): one of those among the reported series ends the run with exit 2.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.commission.calibrate import cache_folder, cached_map
from models.commission.leakage import leaked_series
from models.segmenter.contours import ContourError, LiverContour
from service import dicom_series
from service.commands.gate import evidence_of, models
from service.errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class SeriesOutcome:
    """What the site's gate did with one reported series, and the active segmenter's Dice there."""

    series_instance_uid: str
    group: str  # "normal" (held-out) or "abnormal"
    readable: bool = True
    problem: str = ""
    manual: bool = False
    reason: str | None = None
    fused: float | None = None
    fired: list[str] = field(default_factory=list)
    liver_ml: float | None = None
    dice: float | None = None  # active segmenter vs the site's contour; None without a contour
    candidate_dice: float | None = None  # fine-tuned segmenter vs the same contour


@dataclass(frozen=True)
class Job:
    files: dicom_series.SeriesFiles
    contour: LiverContour | None
    group: str


def assess_one(job: Job) -> tuple[str, SeriesOutcome]:
    """Run the site's gate on one series in a worker process (models of `service.commands.gate.models`)."""
    from service.segmentation import dice

    segmenter, detector, gate = models()
    assert gate is not None
    uid = job.files.series_instance_uid
    try:
        series = dicom_series.load_series(job.files)
    except dicom_series.SeriesError as exc:
        return uid, SeriesOutcome(uid, job.group, readable=False, problem=str(exc), manual=True)
    assessment = gate.assess(series=series, segmenter=segmenter, detector=evidence_of(detector, series))
    decision = assessment.decision
    out = SeriesOutcome(
        uid,
        job.group,
        manual=decision.manual,
        reason=decision.reason.value if decision.reason is not None else None,
        fused=None if decision.fused is None or not math.isfinite(decision.fused) else float(decision.fused),
        fired=[f.signal for f in decision.fired()],
        liver_ml=float(assessment.segmentation.liver_volume_ml),
    )
    if job.contour is not None:
        try:
            out.dice = float(dice(assessment.segmentation.mask, job.contour.volume_for(series)))
        except ContourError as exc:
            out.problem = str(exc)
    return uid, out


def candidate_dice_one(job: Job) -> tuple[str, float | None]:
    """Dice of the process's segmenter (the fine-tuned candidate) against the job's contour."""
    from service.segmentation import dice

    segmenter, _, _ = models()
    uid = job.files.series_instance_uid
    if job.contour is None:
        return uid, None
    try:
        series = dicom_series.load_series(job.files)
        return uid, float(dice(segmenter.segment(series).mask, job.contour.volume_for(series)))
    except (dicom_series.SeriesError, ContourError) as exc:
        log.warning("candidate Dice: series %s: %s", uid, exc)
        return uid, None


def refuse_leakage(uids: list[str], folders: Mapping[str, Path | None]) -> None:
    """Raise UsageError (exit 2, one line) when a model in `folders` was trained or calibrated on a series
    in `uids`."""
    problem = leaked_series(uids, folders)
    if problem is not None:
        raise UsageError(problem)


def evaluate(
    *,
    root: Path,
    jobs_list: list[Job],
    segmenter_dir: Path,
    detector_dir: Path,
    gate_dir: Path,
    candidate_dir: Path | None,
    jobs: int,
    progress: bool,
) -> list[SeriesOutcome]:
    """Every job's outcome under the site's gate (cached per series), with the candidate's Dice when given.

    Raises:
        UsageError: a reported series was used to train or calibrate one of the models.
    """
    from service.gate import Gate
    from service.inference import load_detector
    from service.segmentation import Segmenter

    uids = [j.files.series_instance_uid for j in jobs_list]
    folders: dict[str, Path | None] = {
        "the active segmenter": segmenter_dir,
        "the site's detector": detector_dir,
        "the site's gate": gate_dir,
        "the fine-tuned segmenter": candidate_dir,
    }
    refuse_leakage(uids, folders)
    versions = [Segmenter(segmenter_dir).version, str(load_detector(detector_dir).version), Gate.load(gate_dir).version]
    folder = cache_folder(root, "assess", versions)
    init = (str(segmenter_dir), str(detector_dir), str(gate_dir))
    outcomes = {
        uid: o
        for uid, o in cached_map(
            assess_one,
            jobs_list,
            lambda j: j.files.series_instance_uid,
            folder=folder,
            jobs=jobs,
            init_args=init,
            what="held-out evaluation",
            progress=progress,
        )
    }
    contoured = [j for j in jobs_list if j.contour is not None]
    if candidate_dir is not None and contoured:
        folder = cache_folder(root, "candidate-dice", [Segmenter(candidate_dir).version])
        for uid, d in cached_map(
            candidate_dice_one,
            contoured,
            lambda j: j.files.series_instance_uid,
            folder=folder,
            jobs=jobs,
            init_args=(str(candidate_dir), None),
            what="fine-tuned segmenter",
            progress=progress,
        ):
            outcomes[uid].candidate_dice = d
    return [outcomes[u] for u in uids]


def binomial_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper–Pearson (exact) interval of a proportion k/n; (0, 1) for n = 0."""
    from scipy.stats import beta

    if n == 0:
        return 0.0, 1.0
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def paired_bootstrap(diff: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of `diff` (paired differences), resampling series."""
    if diff.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n, diff.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarise(outcomes: list[SeriesOutcome], target_false_flag_rate: float) -> dict[str, Any]:
    """The numbers of the report: false flags of held-out normals with their exact CI, Dice of the active
    (and fine-tuned) segmenter, what the gate did with each contoured series, recall on abnormal ones."""
    normals = [o for o in outcomes if o.group == "normal"]
    abnormal = [o for o in outcomes if o.group == "abnormal"]
    flagged = sum(o.manual for o in normals)
    lo, hi = binomial_ci(flagged, len(normals))
    reasons: dict[str, int] = {}
    for o in normals:
        if o.manual:
            reasons[o.reason or "unreadable"] = reasons.get(o.reason or "unreadable", 0) + 1
    out: dict[str, Any] = {
        "held_out_normals": len(normals),
        "false_flags": flagged,
        "false_flag_rate": flagged / len(normals) if normals else None,
        "false_flag_rate_ci95": [lo, hi],
        "target_false_flag_rate": target_false_flag_rate,
        "false_flag_reasons": reasons,
        "unreadable": [o.series_instance_uid for o in outcomes if not o.readable],
    }
    with_dice = [o for o in normals if o.dice is not None]
    dice = np.array([o.dice for o in with_dice], float)
    out["segmenter"] = {
        "contoured_held_out": len(with_dice),
        "dice_mean": float(dice.mean()) if dice.size else None,
        "dice_min": float(dice.min()) if dice.size else None,
        "per_series": [
            {
                "series_instance_uid": o.series_instance_uid,
                "dice": o.dice,
                "gate": "manual" if o.manual else "through",
                "reason": o.reason,
                "candidate_dice": o.candidate_dice,
            }
            for o in with_dice
        ],  # fmt: skip
    }
    paired = [o for o in with_dice if o.candidate_dice is not None]
    if paired:
        diff = np.array([float(o.candidate_dice or 0.0) - float(o.dice or 0.0) for o in paired])
        out["segmenter"]["candidate_dice_mean"] = float(np.mean([o.candidate_dice for o in paired]))
        out["segmenter"]["difference_mean"] = float(diff.mean())
        out["segmenter"]["difference_ci95"] = list(paired_bootstrap(diff))
    if abnormal:
        caught = sum(o.manual for o in abnormal)
        out["abnormal"] = {
            "series": len(abnormal),
            "sent_to_manual": caught,
            "recall": caught / len(abnormal),
            "recall_ci95": list(binomial_ci(caught, len(abnormal))),
        }
    return out


def outcomes_as_json(outcomes: list[SeriesOutcome]) -> list[dict[str, Any]]:
    return [asdict(o) for o in outcomes]
