"""`gatekeeper evaluate gate`: how well the gate (each signal and the fused decision) predicts the segmenter's failures.

    gatekeeper evaluate gate --data DIR --out DIR [--gate DIR] [--segmenter DIR] [--detector DIR]
        [--split S] [--jobs N] [--bootstrap N] [--reuse]
    gatekeeper evaluate gate --feedback [--out DIR]

For every CT series under `--data` (phantom runs: every manifest.json at any depth is read), the
detector scores the series and `service.gate.Gate.assess` — the gate the pipeline runs, from
`--gate` (gate.json, default the shipped one) — segments it with its test-time views, measures every
signal and decides. A series with a liver contour (the phantom's organs SEG, or any DICOM-SEG or
RTSTRUCT that refers to it) gets the 3-D Dice of the gate's segmentation against it; a failure is
Dice < 0.95 (also reported: < 0.90). Series without a liver contour (off-target: no liver in the
field of view, not an abdomen) are reported apart: where the gate sent them and why.

Per signal (its tail probability among normals, as −log10) and for the fused statistic: AUROC for
failure, AURC (risk = 1 − Dice, series auto-routed in order of increasing score), recall of failures
when the manual share is the failure prevalence + 5 and + 10 points, the failure rate among the
auto-routed there, with bootstrap 95 % CIs; at the shipped thresholds (the fused gate: its decision,
rules included; a single signal: its own calibrated `threshold_alone`, i.e. as the only signal at the
gate's false-flag rate): recall of Dice < 0.90 and < 0.95, manual share, failure rate among the
auto-routed; a paired bootstrap of AURC(fused) − AURC(signal); all by anomaly type and by severity
grade (the manifest's `severity.grade`). Writes series.json, report.json (`failure_prevalence`,
`fused`, `signals.NAME`: `aurc`, `recall_dice_lt_090`, `recall_dice_lt_095`, `manual_share`, …),
report.md and PNG figures to --out. Runs `--jobs` processes (models loaded once in each) and logs
progress with seconds per series.

With `--feedback` the labels are the dosimetrists' verdicts recorded in the configured database, not
Dice on contoured series; no segmenter or detector runs (`models.segmenter.evaluate_gate_feedback`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.commission.leakage import leaked_series
from models.detector.metrics import auroc
from models.segmenter.evaluate_gate_feedback import run_feedback
from service.commands.gate import anomaly_type, map_with_progress, read_manifests
from service.errors import UsageError
from service.model_paths import DEFAULT_DETECTOR_DIR, DEFAULT_GATE_DIR

if TYPE_CHECKING:
    from service.dicom_series import SeriesFiles

log = logging.getLogger(__name__)

FAILURE_DICE = 0.95
SECONDARY_FAILURE_DICE = 0.90
EXTRA_SHARES = (0.05, 0.10)  # manual share = failure prevalence + these
FUSED = "fused"


def register(what: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = what.add_parser(
        "gate",
        help="how well the gate predicts the segmenter's failures",
        description="Run the detector and the gate (segmentation, test-time views, every signal, the fused "
        "decision) on contoured CT series, compute Dice, and measure per signal and fused how well they predict "
        "Dice < 0.95 (and < 0.90).",
    )
    g.add_argument("--data", type=Path, help="folder tree of CT series with liver contours (needed without --feedback)")
    g.add_argument("--out", type=Path, help="report folder (needed without --feedback)")
    g.add_argument(
        "--feedback",
        action="store_true",
        help="use the dosimetrists' verdicts in the configured database as labels instead of --data "
        "(writes feedback_report.json to --out when given)",
    )
    g.add_argument("--gate", type=Path, default=None, help=f"gate folder with gate.json (default {DEFAULT_GATE_DIR})")
    g.add_argument("--segmenter", type=Path, default=None, help="segmenter model folder (default: shipped)")
    g.add_argument("--detector", type=Path, default=None, help="detector model folder (default: shipped)")
    g.add_argument(
        "--split",
        default=None,
        help="manifest split(s) to evaluate, comma-separated, or 'all' (default: test and test_large when the "
        "manifests have splits, else all)",
    )
    g.add_argument("--jobs", type=int, default=1, help="series evaluated in parallel processes (default 1)")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    g.add_argument("--reuse", action="store_true", help="reuse --out/series.json instead of scoring again")
    g.set_defaults(func=run)


@dataclass
class SeriesResult:
    """The gate's outcome on one series (one row of series.json)."""

    series_instance_uid: str
    folder: str
    anomaly: str  # "normal" or the phantom anomaly type; "unknown" without a manifest
    grade: str  # the manifest's severity grade; "none" for normal series, "unknown" without one
    num_slices: int
    dice: float  # NaN: no liver contour (off-target series)
    manual: bool
    reason: str | None
    fused: float
    signals: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → value, p_value, fired, fired_alone
    liver_volume_ml: float = 0.0
    seconds: float = 0.0
    error: str = ""
    category: str = ""  # the manifest's category: "normal", "anomaly", "off_target" ("" without one)


# --- metrics -------------------------------------------------------------------------------------------


def aurc(scores: np.ndarray, risk: np.ndarray) -> float:
    """Area under the risk–coverage curve: series are auto-routed in order of increasing score;
    at coverage i/n the risk is the mean risk of the i series routed so far; AURC is the mean over i."""
    order = np.argsort(np.asarray(scores, np.float64), kind="mergesort")
    r = np.asarray(risk, np.float64)[order]
    return float(np.mean(np.cumsum(r) / np.arange(1, r.size + 1)))


def optimal_aurc(risk: np.ndarray) -> float:
    """AURC of an oracle that routes series in order of their true risk (the floor)."""
    return aurc(risk, risk)


def review_outcome(scores: np.ndarray, failed: np.ndarray, rate: float) -> dict[str, float]:
    """Review the ⌈rate·n⌉ highest-scoring series: recall of failures and failure rate in the rest."""
    n = scores.size
    k = int(np.ceil(min(rate, 1.0) * n - 1e-9))
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    reviewed = np.zeros(n, bool)
    reviewed[order[:k]] = True
    return outcome_of(reviewed, failed) | {"review_rate": rate, "reviewed": k}


def outcome_of(manual: np.ndarray, failed: np.ndarray) -> dict[str, float]:
    """Recall of failures among the series sent to manual, the manual share, the failure rate in the rest."""
    n_fail = int(failed.sum())
    rest = ~manual
    return {
        "failures": n_fail,
        "caught": int((failed & manual).sum()),
        "recall": float((failed & manual).sum() / n_fail) if n_fail else float("nan"),
        "manual_share": float(manual.mean()) if manual.size else float("nan"),
        "residual_failure_rate": float(failed[rest].mean()) if rest.any() else 0.0,
    }


def _boot(fn: Callable[[np.ndarray], float], n_items: int, n: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    vals = [fn(rng.integers(0, n_items, n_items)) for _ in range(n)]
    return [round(float(v), 4) for v in np.nanpercentile(vals, [2.5, 97.5])]


class Mahalanobis:
    """Mahalanobis distance of features to reference rows (shrunk covariance); see `service.gate.fit_mahalanobis`."""

    def __init__(self, features: np.ndarray, shrink: float = 0.1) -> None:
        from service.gate import fit_mahalanobis

        self.mean, self.precision = fit_mahalanobis(features, shrink)

    def distance(self, features: np.ndarray) -> np.ndarray:
        d = features - self.mean
        distance: np.ndarray = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, self.precision, d), 0.0))
        return distance


# --- scoring (one series per call, in a worker process) ------------------------------------------------


@dataclass
class _Job:
    files: SeriesFiles
    contour: str | None  # path of the series' liver contour file (SEG), or None: look it up among `files`
    anomaly: str
    grade: str
    folder: str
    category: str = ""


def _score_one(job: _Job) -> SeriesResult:
    """Detector, gate and Dice on one series, with this process's models (`service.commands.gate.load_models`)."""
    from models.segmenter.contours import ContourError, NoLiver, read_liver_contour
    from service import dicom_series
    from service.commands.gate import evidence_of, models
    from service.segmentation import dice

    t0 = time.monotonic()
    segmenter, detector, gate = models()
    assert gate is not None
    base = SeriesResult(
        job.files.series_instance_uid, job.folder, job.anomaly, job.grade, 0, float("nan"), True, None, 0.0
    )
    try:
        series = dicom_series.load_series(job.files)
    except dicom_series.SeriesError as exc:
        base.error = str(exc)
        return base
    truth = None
    if job.contour is not None:
        try:
            truth = read_liver_contour(Path(job.contour), job.files).volume_for(series)
        except NoLiver:
            truth = None
        except (ContourError, OSError, ValueError) as exc:
            log.warning("contour of %s unusable: %s", job.folder, exc)
    evidence = evidence_of(detector, series)
    assessment = gate.assess(series=series, segmenter=segmenter, detector=evidence)
    decision = assessment.decision
    rate = float(gate.config.get("false_flag_rate", 0.05))
    signals = {}
    for f in decision.findings:
        if f.signal in gate.specs:
            signals[f.signal] = {
                "value": f.value,
                "p_value": f.p_value,
                "fired": f.fired,
                "fired_alone": bool(math.isfinite(f.p_value) and f.p_value < rate),
            }
        else:
            signals[f.signal] = {"value": f.value, "fired": f.fired, "rule": True}
    return SeriesResult(
        series_instance_uid=job.files.series_instance_uid,
        folder=job.folder,
        anomaly=job.anomaly,
        grade=job.grade,
        num_slices=series.num_slices,
        dice=dice(assessment.segmentation.mask, truth) if truth is not None and truth.any() else float("nan"),
        manual=decision.manual,
        reason=decision.reason.value if decision.reason is not None else None,
        fused=float(decision.fused or 0.0),
        signals=signals,
        liver_volume_ml=assessment.segmentation.liver_volume_ml,
        seconds=time.monotonic() - t0,
        category=job.category,
    )


def _grade(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "unknown"
    anomaly = entry.get("anomaly") or {}
    severity = entry.get("severity") or anomaly.get("severity") or {}
    if not anomaly:
        return "none"
    return str(severity.get("grade") or "unknown")


def plan_jobs(root: Path, splits: set[str] | None, jobs: int) -> list[_Job]:
    """One job per CT series under `root` in `splits` (None: all), with its contour file and manifest labels."""
    from models.detector.data import scan_parallel
    from models.segmenter.contours import find_liver_contours
    from service import dicom_series

    groups = scan_parallel(root, jobs)
    entries = read_manifests(root)
    cts = dicom_series.ct_series_in(groups)
    if entries:
        has_splits = any(e.get("split") for e in entries.values())
        if splits is None and has_splits:
            splits = {"test", "test_large"}
        if splits is not None and has_splits:
            cts = [g for g in cts if entries.get(g.series_instance_uid, {}).get("split") in splits]
    contour_paths: dict[str, str] = {}
    if entries:
        for uid, entry in entries.items():
            seg = Path(entry["_root"]) / str(entry.get("folder", "")) / str(entry.get("organs_seg", ""))
            if entry.get("organs_seg") and seg.is_file():
                contour_paths[uid] = str(seg)
    else:
        for uid, contour in find_liver_contours(groups).items():
            contour_paths[uid] = str(contour.path)
    out = []
    for g in sorted(cts, key=lambda g: str(g.folder)):
        e = entries.get(g.series_instance_uid)
        try:
            folder = str(Path(g.folder).relative_to(root))
        except ValueError:
            folder = str(g.folder)
        category = str((e or {}).get("category") or "")
        out.append(_Job(g, contour_paths.get(g.series_instance_uid), anomaly_type(e), _grade(e), folder, category))
    return out


# --- report --------------------------------------------------------------------------------------------


def _scores(results: list[SeriesResult], name: str) -> np.ndarray:
    """Per series, the score the series are ranked by: for the fused gate its fused statistic, +inf where a
    rule (no liver, not an abdomen, geometry …) sent it to manual; for a signal its −log10 tail probability,
    +inf where it could not be measured (no liver found: the rules send such a series to manual)."""
    if name == FUSED:
        return np.array(
            [math.inf if r.manual and r.reason != "gate_evidence" else r.fused for r in results], np.float64
        )
    out = []
    for r in results:
        p = r.signals.get(name, {}).get("p_value")
        out.append(-math.log10(max(p, 1e-300)) if p is not None and math.isfinite(p) else math.inf)
    return np.array(out, np.float64)


def _flags(results: list[SeriesResult], name: str) -> np.ndarray:
    """Per series: sent to manual — the gate's decision (fused), or for a signal: it fires alone at its
    `threshold_alone`, or it could not be measured (see `_scores`)."""
    if name == FUSED:
        return np.array([r.manual for r in results], bool)
    return np.array(
        [
            bool(r.signals.get(name, {}).get("fired_alone", False))
            or not math.isfinite(r.signals.get(name, {}).get("p_value") or math.nan)
            for r in results
        ],
        bool,
    )


def score_block(
    scores: np.ndarray, flags: np.ndarray, dice: np.ndarray, prevalence: float, n_boot: int, seed: int = 0
) -> dict[str, Any]:
    """Every number the report gives for one score (a signal or the fused gate) on the contoured series."""
    failed, failed90 = dice < FAILURE_DICE, dice < SECONDARY_FAILURE_DICE
    risk = 1.0 - dice
    at = outcome_of(flags, failed)
    out: dict[str, Any] = {
        "auroc": auroc(scores[~failed], scores[failed]),
        "aurc": aurc(scores, risk),
        "recall_dice_lt_095": at["recall"],
        "recall_dice_lt_090": outcome_of(flags, failed90)["recall"],
        "manual_share": at["manual_share"],
        "failure_rate_auto_routed": at["residual_failure_rate"],
        "at_share": {},
    }
    for extra in EXTRA_SHARES:
        share = prevalence + extra
        o = review_outcome(scores, failed, share)
        o90 = review_outcome(scores, failed90, share)
        out["at_share"][f"prevalence+{round(100 * extra)}"] = {
            "manual_share": share,
            "recall_dice_lt_095": o["recall"],
            "recall_dice_lt_090": o90["recall"],
            "failure_rate_auto_routed": o["residual_failure_rate"],
        }
    if n_boot and failed.any() and (~failed).any():
        n = scores.size
        out["auroc_ci"] = _boot(lambda i: auroc(scores[i][~failed[i]], scores[i][failed[i]]), n, n_boot, seed)
        out["aurc_ci"] = _boot(lambda i: aurc(scores[i], risk[i]), n, n_boot, seed + 1)
        out["recall_dice_lt_095_ci"] = _boot(lambda i: outcome_of(flags[i], failed[i])["recall"], n, n_boot, seed + 2)
        out["manual_share_ci"] = _boot(lambda i: float(flags[i].mean()), n, n_boot, seed + 3)
        share = prevalence + EXTRA_SHARES[-1]
        out["at_share"][f"prevalence+{round(100 * EXTRA_SHARES[-1])}"]["recall_dice_lt_095_ci"] = _boot(
            lambda i: review_outcome(scores[i], failed[i], share)["recall"], n, n_boot, seed + 4
        )
    return out


def _paired_aurc(a: np.ndarray, b: np.ndarray, risk: np.ndarray) -> Callable[[np.ndarray], float]:
    """AURC(a) − AURC(b) on a bootstrap resample (the same series for both: a paired comparison)."""
    return lambda i: aurc(a[i], risk[i]) - aurc(b[i], risk[i])


def _group_table(results: list[SeriesResult], key: Callable[[SeriesResult], str], names: list[str]) -> dict[str, Any]:
    """Per group (anomaly type or severity grade): series, failures, Dice, and what the gate and each signal caught."""
    table: dict[str, Any] = {}
    for value in sorted({key(r) for r in results}):
        sel = [r for r in results if key(r) == value]
        d = np.array([r.dice for r in sel])
        contoured = np.isfinite(d)
        failed = contoured & (d < FAILURE_DICE)
        manual = np.array([r.manual for r in sel], bool)
        row: dict[str, Any] = {
            "series": len(sel),
            "contoured": int(contoured.sum()),
            "dice_mean": float(d[contoured].mean()) if contoured.any() else None,
            "failures": int(failed.sum()),
            "failures_lt_090": int((contoured & (d < SECONDARY_FAILURE_DICE)).sum()),
            "manual": int(manual.sum()),
            "caught": int((failed & manual).sum()),
            "reasons": {},
            "signal_fired_alone": {},
        }
        for r in sel:
            if r.reason:
                row["reasons"][r.reason] = row["reasons"].get(r.reason, 0) + 1
        for name in names:
            row["signal_fired_alone"][name] = int(_flags(sel, name).sum())
        table[value] = row
    return table


def build_report(
    results: list[SeriesResult], n_boot: int, meta: dict[str, Any], gate_config: dict[str, Any]
) -> dict[str, Any]:
    """report.json: `failure_prevalence`, `fused` and `signals.NAME` (see the module docstring), tables, targets."""
    # Off-target series (no liver in the field of view, a partly covered liver, not an abdomen) have reasons of
    # their own; the failure metrics are on the series the liver model applies to.
    off_target = [r for r in results if not r.error and (r.category == "off_target" or not math.isfinite(r.dice))]
    contoured = [r for r in results if not r.error and r.category != "off_target" and math.isfinite(r.dice)]
    if not contoured:
        raise ValueError("no series with a liver contour was evaluated")
    dice = np.array([r.dice for r in contoured])
    failed = dice < FAILURE_DICE
    prevalence = float(failed.mean())
    names = [n for n in gate_config.get("signals", {}) if any(n in r.signals for r in contoured)]
    report: dict[str, Any] = {
        "meta": meta,
        "series": len(results),
        "contoured": len(contoured),
        "errors": [{"folder": r.folder, "error": r.error} for r in results if r.error],
        "failure_prevalence": prevalence,
        "failure_prevalence_lt_090": float((dice < SECONDARY_FAILURE_DICE).mean()),
        "failures": int(failed.sum()),
        "oracle_aurc": optimal_aurc(1 - dice),
        "random_aurc": float(np.mean(1 - dice)),
        "gate": {
            "version": gate_config.get("version"),
            "false_flag_rate": gate_config.get("false_flag_rate"),
            "fused_threshold": gate_config.get("fusion", {}).get("threshold"),
        },
    }
    fused_scores = _scores(contoured, FUSED)
    report[FUSED] = score_block(fused_scores, _flags(contoured, FUSED), dice, prevalence, n_boot)
    report["signals"] = {}
    risk = 1 - dice
    for k, name in enumerate(names):
        s = _scores(contoured, name)
        block = score_block(s, _flags(contoured, name), dice, prevalence, n_boot, seed=10 * (k + 1))
        if n_boot:
            block["aurc_fused_minus_signal_ci"] = _boot(_paired_aurc(fused_scores, s, risk), dice.size, n_boot, 7)
        report["signals"][name] = block
    normals = np.array([r.anomaly == "normal" for r in contoured])
    manual = _flags(contoured, FUSED)
    report["normals_sent_to_manual"] = float(manual[normals].mean()) if normals.any() else None
    report["by_type"] = _group_table(contoured, lambda r: r.anomaly, names)
    report["by_grade"] = _group_table(
        [r for r in contoured if r.anomaly != "normal"], lambda r: f"{r.anomaly}/{r.grade}", names
    )
    report["off_target"] = [
        {"folder": r.folder, "anomaly": r.anomaly, "manual": r.manual, "reason": r.reason} for r in off_target
    ]
    report["off_target_by_kind"] = {
        kind: {
            "series": sum(r.anomaly == kind for r in off_target),
            "manual": sum(r.manual for r in off_target if r.anomaly == kind),
            "reasons": {
                reason: sum(r.reason == reason for r in off_target if r.anomaly == kind)
                for reason in sorted({str(r.reason) for r in off_target if r.anomaly == kind})
            },
        }
        for kind in sorted({r.anomaly for r in off_target})
    }
    fused = report[FUSED]
    single_aurcs = [b["aurc"] for b in report["signals"].values()]
    report["targets"] = {
        "recall_dice_lt_090_ge_0.99": fused["recall_dice_lt_090"] >= 0.99
        if math.isfinite(fused["recall_dice_lt_090"])
        else None,
        "recall_dice_lt_095_ge_0.95": fused["recall_dice_lt_095"] >= 0.95
        if math.isfinite(fused["recall_dice_lt_095"])
        else None,
        "manual_share_le_prevalence_plus_10": fused["manual_share"] <= prevalence + 0.10,
        "failure_rate_auto_routed_le_0.01": fused["failure_rate_auto_routed"] <= 0.01,
        "fused_aurc_below_every_signal": bool(single_aurcs) and fused["aurc"] < min(single_aurcs),
        "normals_sent_to_manual_le_0.05": report["normals_sent_to_manual"] <= 0.05
        if report["normals_sent_to_manual"] is not None
        else None,
    }
    seconds = [r.seconds for r in results if r.seconds]
    report["seconds_per_series"] = {
        "worker_mean": float(np.mean(seconds)) if seconds else None,
        "worker_max": float(np.max(seconds)) if seconds else None,
        "wall": meta.get("seconds", 0.0) / max(len(results), 1),
    }
    return report


def _finite(x: Any) -> Any:
    """`x` with every NaN or infinite float replaced by None (report.json is strict JSON)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, float | np.floating) and not math.isfinite(float(x)):
        return None
    if isinstance(x, np.floating | np.integer | np.bool_):
        return x.item()
    return x


def _f(v: float | None, nd: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def _ci(v: list[float] | None, nd: int = 3) -> str:
    return f" [{_f(v[0], nd)}, {_f(v[1], nd)}]" if v else ""


def report_markdown(report: dict[str, Any], plots: list[str]) -> str:
    m = report["meta"]
    prev = report["failure_prevalence"]
    lines = [
        f"# Gate evaluation: does the gate catch the segmenter's failures? ({m['data']})",
        "",
        f"- Series: {report['series']} ({report['contoured']} with a liver contour; split {m['splits']}); gate "
        f"`{m['gate']}` (version {report['gate']['version']}, false-flag rate {report['gate']['false_flag_rate']}, "
        f"fused cut {_f(report['gate']['fused_threshold'], 2)}); segmenter version {m['segmenter_version']}; "
        f"detector `{m['detector']}`.",
        f"- Command: `{m['command']}`; {m['seconds']:.0f} s on {m['machine']} with {m['jobs']} process(es): "
        f"{_f(report['seconds_per_series']['wall'], 1)} s per series wall, "
        f"{_f(report['seconds_per_series']['worker_mean'], 1)} s per series in a worker "
        f"(max {_f(report['seconds_per_series']['worker_max'], 1)} s).",
        f"- Failure: 3-D liver Dice < 0.95 against the contour (prevalence {100 * prev:.1f} %, "
        f"{report['failures']} series; Dice < 0.90: {100 * report['failure_prevalence_lt_090']:.1f} %). "
        f"Risk = 1 − Dice. Oracle AURC {_f(report['oracle_aurc'], 4)}, random order {_f(report['random_aurc'], 4)}.",
        "- Scores: each signal's tail probability among normal series as −log10 p; `fused` = the gate's "
        "fused statistic (−log10 of the smallest p). At threshold: the fused gate's decision (rules included); "
        "a signal alone at its `threshold_alone` (the gate's false-flag rate as the only signal).",
        "",
        "| score | AUROC [95 % CI] | AURC [95 % CI] | recall < 0.90 | recall < 0.95 [CI] | manual share | "
        "failures among auto-routed | recall < 0.95 @ prev+5 | @ prev+10 [CI] | recall < 0.90 @ prev+10 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(FUSED, report[FUSED])] + list(report["signals"].items())
    for name, b in rows:
        p5, p10 = b["at_share"]["prevalence+5"], b["at_share"]["prevalence+10"]
        lines.append(
            f"| {name} | {_f(b['auroc'])}{_ci(b.get('auroc_ci'))} | {_f(b['aurc'], 4)}{_ci(b.get('aurc_ci'), 4)} | "
            f"{_f(b['recall_dice_lt_090'], 2)} | {_f(b['recall_dice_lt_095'], 2)}{_ci(b.get('recall_dice_lt_095_ci'), 2)} | "
            f"{_f(b['manual_share'], 3)} | {_f(b['failure_rate_auto_routed'], 3)} | {_f(p5['recall_dice_lt_095'], 2)} | "
            f"{_f(p10['recall_dice_lt_095'], 2)}{_ci(p10.get('recall_dice_lt_095_ci'), 2)} | "
            f"{_f(p10['recall_dice_lt_090'], 2)} |"
        )
    lines += ["", "Paired bootstrap of AURC(fused) − AURC(signal) (negative: the fused gate is better):", ""]
    for name, b in report["signals"].items():
        if "aurc_fused_minus_signal_ci" in b:
            lines.append(f"- {name}: {_ci(b['aurc_fused_minus_signal_ci'], 4).strip()}")
    for title, key in (("By anomaly type", "by_type"), ("By severity grade", "by_grade")):
        lines += [
            "",
            f"## {title}",
            "",
            "| group | series | contoured | mean Dice | < 0.95 | < 0.90 | to manual | failures caught | reasons |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for g, row in report[key].items():
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(row["reasons"].items()))
            lines.append(
                f"| {g} | {row['series']} | {row['contoured']} | {_f(row['dice_mean'])} | {row['failures']} | "
                f"{row['failures_lt_090']} | {row['manual']} | {row['caught']}/{row['failures']} | {reasons} |"
            )
    names = list(report["signals"])
    if names:
        lines += [
            "",
            "## Which signal fires alone, by anomaly type",
            "",
            "| type | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for g, row in report["by_type"].items():
            lines.append(f"| {g} | " + " | ".join(str(row["signal_fired_alone"][n]) for n in names) + " |")
    if report["off_target"]:
        lines += [
            "",
            "## Off-target series (manifest category off_target, or no liver in the contour)",
            "",
            "| kind | series | to manual | reasons |",
            "|---|---|---|---|",
        ]
        for kind, row in report["off_target_by_kind"].items():
            reasons = ", ".join(f"{k} {v}" for k, v in row["reasons"].items())
            lines.append(f"| {kind} | {row['series']} | {row['manual']} | {reasons} |")
    t = report["targets"]
    lines += ["", "## Targets (issue 15)", ""]
    for k, v in t.items():
        lines.append(f"- {k}: **{'met' if v else ('n/a' if v is None else 'missed')}**")
    lines += ["", *[f"![{p}]({p})" for p in plots]]
    return "\n".join(lines) + "\n"


def write_plots(results: list[SeriesResult], report: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contoured = [r for r in results if math.isfinite(r.dice) and not r.error]
    dice = np.array([r.dice for r in contoured])
    risk, failed = 1 - dice, dice < FAILURE_DICE
    n = dice.size
    names = [FUSED, *report["signals"]]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    cmap = plt.get_cmap("tab20")
    for k, name in enumerate(names):
        s = _scores(contoured, name)
        order = np.argsort(s, kind="mergesort")
        style = {"color": "black", "lw": 2.2} if name == FUSED else {"color": cmap(k % 20), "lw": 1}
        axes[0].plot(np.arange(1, n + 1) / n, np.cumsum(risk[order]) / np.arange(1, n + 1), label=name, **style)
        rates = np.linspace(0, 1, 101)
        axes[1].plot(rates * 100, [review_outcome(s, failed, r)["recall"] for r in rates], label=name, **style)
    axes[0].plot(np.arange(1, n + 1) / n, np.cumsum(np.sort(risk)) / np.arange(1, n + 1), "k:", label="oracle")
    axes[0].set(xlabel="coverage (fraction auto-routed)", ylabel="risk (mean 1 − Dice)", title="Risk–coverage")
    prev = report["failure_prevalence"]
    for extra in EXTRA_SHARES:
        axes[1].axvline(100 * (prev + extra), color="grey", ls="--", lw=1)
    axes[1].axhline(0.95, color="grey", ls=":")
    fused = report[FUSED]
    axes[1].scatter([100 * fused["manual_share"]], [fused["recall_dice_lt_095"]], color="red", zorder=5, label="gate")
    axes[1].set(xlabel="manual share (%)", ylabel="recall of failures (Dice < 0.95)", title="Failures caught vs load")
    types = sorted({r.anomaly for r in contoured})
    for i, t in enumerate(types):
        sel = [r for r in contoured if r.anomaly == t]
        x = np.full(len(sel), i) + np.random.default_rng(i).uniform(-0.15, 0.15, len(sel))
        colours = ["tab:red" if r.manual else "tab:green" for r in sel]
        axes[2].scatter(x, [r.dice for r in sel], s=12, c=colours)
    axes[2].axhline(FAILURE_DICE, color="red", ls="--", lw=1)
    axes[2].set_xticks(range(len(types)), types, rotation=30, ha="right")
    axes[2].set(
        ylabel="liver Dice", title="Dice by type (red: to manual, green: auto)", ylim=(max(0.0, dice.min() - 0.05), 1.0)
    )
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "gate_curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.6))
    for t in types:
        sel = [r for r in contoured if r.anomaly == t]
        ax.scatter([r.fused for r in sel], [r.dice for r in sel], s=12, label=t)
    ax.axhline(FAILURE_DICE, color="red", ls="--", lw=1)
    if report["gate"]["fused_threshold"] is not None:
        ax.axvline(report["gate"]["fused_threshold"], color="grey", ls="--", lw=1)
    ax.set_xscale("symlog")
    ax.set(xlabel="fused statistic (−log10 smallest p)", ylabel="liver Dice", title="Dice vs the fused statistic")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dice_vs_fused.png", dpi=110)
    plt.close(fig)
    return ["gate_curves.png", "dice_vs_fused.png"]


def run(args: argparse.Namespace) -> int:
    import os
    import platform
    import shlex
    import sys

    from service.gate import Gate
    from service.segmentation import DEFAULT_MODEL_DIR as DEFAULT_SEGMENTER
    from service.segmentation import Segmenter

    if args.feedback:
        return run_feedback(args)
    if args.data is None or args.out is None:
        raise UsageError("--data and --out are needed (or --feedback for the dosimetrists' verdicts)")
    if not args.data.is_dir():
        raise UsageError(f"--data {args.data}: no such folder")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    splits = None if args.split in (None, "all") else set(args.split.split(","))
    gate_dir = args.gate or DEFAULT_GATE_DIR
    seg_dir, det_dir = args.segmenter or DEFAULT_SEGMENTER, args.detector or DEFAULT_DETECTOR_DIR
    try:
        gate = Gate.load(gate_dir)
        segmenter_version = Segmenter(seg_dir).version
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise UsageError(f"model: {exc}") from None
    if not gate.calibrated:
        raise UsageError(f"--gate {gate_dir}: gate.json has no calibrated signals (run `gatekeeper calibrate gate`)")
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "series.json"
    t0 = time.monotonic()
    if args.reuse and cache.is_file():
        saved = json.loads(cache.read_text())
        results = [SeriesResult(**r) for r in saved["results"]]
        seconds, jobs = saved["seconds"], saved.get("jobs", args.jobs)
    else:
        plan = plan_jobs(args.data, splits, args.jobs)
        if not plan:
            raise UsageError(f"--data {args.data}: no CT series" + (f" in split {sorted(splits)}" if splits else ""))
        leak = leaked_series(
            [j.files.series_instance_uid for j in plan],
            {"--gate": gate_dir, "--segmenter": seg_dir, "--detector": det_dir},
        )
        if leak is not None:
            raise UsageError(leak)
        log.info("evaluating the gate on %d series with %d process(es)", len(plan), args.jobs)
        init = (str(seg_dir), str(det_dir), str(gate_dir))
        results = list(map_with_progress(_score_one, plan, args.jobs, init, "evaluate gate"))
        seconds, jobs = time.monotonic() - t0, args.jobs
        cache.write_text(
            json.dumps({"seconds": seconds, "jobs": jobs, "results": [asdict(r) for r in results]}, default=float)
        )
    meta = {
        "data": str(args.data),
        "splits": "all" if splits is None else ",".join(sorted(splits)),
        "gate": str(gate_dir),
        "segmenter": str(seg_dir),
        "segmenter_version": segmenter_version,
        "detector": str(det_dir),
        "seconds": seconds,
        "jobs": jobs,
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "command": "gatekeeper evaluate gate " + " ".join(shlex.quote(a) for a in sys.argv[3:]),
    }
    try:
        report = build_report(results, args.bootstrap, meta, gate.config)
    except ValueError as exc:
        raise UsageError(f"--data {args.data}: {exc}") from None
    plots = write_plots(results, report, args.out)
    (args.out / "report.json").write_text(json.dumps(_finite(report), indent=1, default=float) + "\n")
    (args.out / "report.md").write_text(report_markdown(report, plots))
    fused = report[FUSED]
    print(
        f"{report['series']} series ({report['contoured']} contoured), failure prevalence "
        f"{100 * report['failure_prevalence']:.1f} %; fused gate: AURC {_f(fused['aurc'], 4)}, recall < 0.95 "
        f"{_f(fused['recall_dice_lt_095'], 2)}, < 0.90 {_f(fused['recall_dice_lt_090'], 2)}, manual share "
        f"{_f(fused['manual_share'], 2)}; {seconds / max(len(results), 1):.1f} s per series; report in "
        f"{args.out / 'report.md'}"
    )
    return 0
