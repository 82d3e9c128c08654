"""`gatekeeper evaluate gate`: how well each score predicts the segmenter's failures.

    gatekeeper evaluate gate --data DIR --out DIR [--segmenter DIR] [--detector DIR] [--train-data DIR]
    gatekeeper evaluate gate --feedback [--out DIR]

With `--feedback` the labels are the dosimetrists' verdicts recorded in the configured database
(`gatekeeper feedback list`), not Dice on contoured series: a `no` (the auto contour was, or would
have been, unacceptable) is a failure the gate should have sent to manual contouring, a `yes` a
series it could have let through; `not_applicable` is left out, and of several verdicts on one
series version the newest counts. Per gate signal stored in the database (the detector's score ÷
its threshold, the detector's flag, geometry findings, the route the pipeline took) it reports
the counts and, where both verdicts occur, the AUROC for `no`. No segmenter or detector runs.

For every CT series under `--data` that has a liver contour (DICOM-SEG or RTSTRUCT, matched by
referenced SeriesInstanceUID — a phantom test split or a hospital's own contoured series), the
segmenter runs (ONNX Runtime), its 3-D Dice against the contour is computed, and a failure is
Dice < 0.95 (also reported: < 0.90). Scores compared on the same series:

* `gate`: the GAN detector's series score (the product's gate);
* `entropy`: the segmenter's mean binary entropy around its predicted liver;
* `mahalanobis`: Mahalanobis distance of the segmenter's bottleneck features (per slice, fitted on
  the liver slices of the normal training series with a shrunk covariance; series score = mean
  over its predicted-liver slices) — the published best liver-failure detector;
* `combined`: max of the gate's and the Mahalanobis score, each as a z-score on the validation
  normal series.

For each: AUROC and AUPRC for failure, AURC (area under the risk–coverage curve, risk = 1 − Dice,
series auto-routed in order of increasing score), recall of failures when the 10/20/30 % (and
15 %) highest-scoring series are reviewed, the failure rate among the auto-routed rest, bootstrap
95 % CIs; and per anomaly type when a phantom manifest names them. Writes series.json (per-series
numbers), report.json, report.md and PNG plots to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.detector.metrics import auprc, auroc
from service.errors import UsageError
from service.model_paths import DEFAULT_DETECTOR_DIR

if TYPE_CHECKING:
    from models.segmenter.contours import LiverContour
    from service.dicom_series import SeriesFiles
    from service.feedback import FeedbackLabel
    from service.inference import Detector
    from service.segmentation import Segmenter

log = logging.getLogger(__name__)

FAILURE_DICE = 0.95
SECONDARY_FAILURE_DICE = 0.90
REVIEW_RATES = (0.10, 0.15, 0.20, 0.30)
TARGET_REVIEW_RATE = 0.15
TARGET_RECALL = 0.95
SCORES = ("gate", "entropy", "mahalanobis", "combined")


def register(what: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = what.add_parser(
        "gate",
        help="how well the gate predicts the segmenter's failures",
        description="Run the segmenter on contoured CT series, compute Dice, and measure how well the "
        "detector's score (and the entropy / Mahalanobis baselines) predict Dice < 0.95.",
    )
    g.add_argument("--data", type=Path, help="folder tree of CT series with liver contours (needed without --feedback)")
    g.add_argument("--out", type=Path, help="report folder (needed without --feedback)")
    g.add_argument(
        "--feedback",
        action="store_true",
        help="use the dosimetrists' verdicts in the configured database as labels instead of --data "
        "(writes feedback_report.json to --out when given)",
    )
    g.add_argument("--segmenter", type=Path, default=None, help="segmenter model folder (default: shipped)")
    g.add_argument("--detector", type=Path, default=None, help="detector model folder (default: shipped)")
    g.add_argument(
        "--train-data",
        type=Path,
        default=None,
        help="normal contoured series to fit the Mahalanobis baseline and the z-scores on "
        "(phantom run with train/validation splits; default: --data when it has them)",
    )
    g.add_argument(
        "--split", default=None, help="manifest split(s) to evaluate, comma-separated (default: test and test_large)"
    )
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    g.add_argument("--reuse", action="store_true", help="reuse --out/series.json instead of scoring again")
    g.set_defaults(func=run)


@dataclass
class SeriesResult:
    series_instance_uid: str
    folder: str
    anomaly: str  # "normal" or the phantom anomaly type; "unknown" without a manifest
    num_slices: int
    dice: float
    gate: float
    gate_flagged: bool
    entropy: float
    mahalanobis: float
    combined: float = float("nan")
    liver_volume_ml: float = 0.0


# --- metrics -------------------------------------------------------------------------------------------


def aurc(scores: np.ndarray, risk: np.ndarray) -> float:
    """Area under the risk–coverage curve: series are auto-routed in order of increasing score;
    at coverage i/n the risk is the mean risk of the i series routed so far; AURC is the mean over i."""
    order = np.argsort(np.asarray(scores, np.float64), kind="mergesort")
    r = np.asarray(risk, np.float64)[order]
    return float(np.mean(np.cumsum(r) / np.arange(1, r.size + 1)))


def review_outcome(scores: np.ndarray, failed: np.ndarray, rate: float) -> dict[str, float]:
    """Review the ⌈rate·n⌉ highest-scoring series: recall of failures and failure rate in the rest."""
    n = scores.size
    k = int(np.ceil(rate * n - 1e-9))
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    reviewed = np.zeros(n, bool)
    reviewed[order[:k]] = True
    n_fail = int(failed.sum())
    caught = int((failed & reviewed).sum())
    rest = ~reviewed
    return {
        "review_rate": rate,
        "reviewed": k,
        "failures": n_fail,
        "caught": caught,
        "recall": caught / n_fail if n_fail else float("nan"),
        "residual_failure_rate": float(failed[rest].mean()) if rest.any() else 0.0,
    }


def _boot(fn: Callable[[np.ndarray], float], n_items: int, n: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    vals = [fn(rng.integers(0, n_items, n_items)) for _ in range(n)]
    return [round(float(v), 4) for v in np.nanpercentile(vals, [2.5, 97.5])]


def score_summary(scores: np.ndarray, dice: np.ndarray, cut: float, n_boot: int) -> dict[str, Any]:
    failed = dice < cut
    risk = 1.0 - dice

    def au(idx: np.ndarray) -> float:
        return auroc(scores[idx][~failed[idx]], scores[idx][failed[idx]])

    out = {
        "failures": int(failed.sum()),
        "series": int(scores.size),
        "auroc": auroc(scores[~failed], scores[failed]),
        "auprc": auprc(scores[~failed], scores[failed]),
        "aurc": aurc(scores, risk),
        "review": [review_outcome(scores, failed, r) for r in REVIEW_RATES],
    }
    if n_boot and failed.any() and (~failed).any():
        out["auroc_ci"] = _boot(au, scores.size, n_boot)
        out["aurc_ci"] = _boot(lambda i: aurc(scores[i], risk[i]), scores.size, n_boot, seed=1)
        out["recall_at_15_ci"] = _boot(
            lambda i: review_outcome(scores[i], failed[i], TARGET_REVIEW_RATE)["recall"], scores.size, n_boot, seed=2
        )
    return out


def optimal_aurc(risk: np.ndarray) -> float:
    """AURC of an oracle that routes series in order of their true risk (the floor)."""
    return aurc(risk, risk)


# --- scoring -------------------------------------------------------------------------------------------


class Mahalanobis:
    """Mahalanobis distance of bottleneck features to the normal training slices (shrunk covariance)."""

    def __init__(self, features: np.ndarray, shrink: float = 0.1) -> None:
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"features must be [n >= 2, F], got {features.shape}.")
        self.mean = features.mean(0)
        cov = np.cov(features, rowvar=False)
        cov = (1 - shrink) * cov + shrink * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
        self.precision = np.linalg.inv(cov)

    def distance(self, features: np.ndarray) -> np.ndarray:
        d = features - self.mean
        distance: np.ndarray = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, self.precision, d), 0.0))
        return distance


def _liver_slices(mask: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(mask.any(axis=(1, 2)))
    return idx if idx.size else np.arange(mask.shape[0])


def _contoured_series(
    root: Path, splits: set[str] | None
) -> tuple[list[SeriesFiles], dict[str, LiverContour], dict[str, dict[str, Any]]]:
    """(CT SeriesFiles with a liver contour, contours by UID, manifest entry by UID) under `root`."""
    from models.detector.data import cpu_count, scan_parallel
    from models.segmenter.contours import find_liver_contours
    from service import dicom_series

    groups = scan_parallel(root, cpu_count())
    contours = find_liver_contours(groups)
    entries = {}
    manifest = root / "manifest.json"
    if manifest.is_file():
        entries = {e["series_instance_uid"]: e for e in json.loads(manifest.read_text()).get("series", [])}
    cts = [g for g in dicom_series.ct_series_in(groups) if g.series_instance_uid in contours]
    if splits is not None and entries:
        cts = [g for g in cts if entries.get(g.series_instance_uid, {}).get("split") in splits]
    return sorted(cts, key=lambda g: str(g.folder)), contours, entries


def _anomaly(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "unknown"
    return (entry.get("anomaly") or {}).get("type") or "normal"


def fit_reference(train_root: Path, segmenter: Segmenter, detector: Detector) -> dict[str, Any]:
    """Mahalanobis model from the training split's liver slices; z-score parameters from the validation split."""
    from service import dicom_series

    groups, _, entries = _contoured_series(train_root, {"train", "validation"})
    if not entries:
        raise ValueError(f"{train_root}: needs a phantom manifest with train/validation splits for the references")
    train_feats, val = [], []
    for g in groups:
        series = dicom_series.load_series(g)
        seg = segmenter.segment(series)
        if seg.features is None:
            raise ValueError("the segmenter's ONNX graph has no 'features' output; the Mahalanobis baseline needs it")
        liver_features = seg.features[_liver_slices(seg.mask)]
        split = entries[g.series_instance_uid]["split"]
        if split == "train":
            train_feats.append(liver_features)
        else:
            val.append((series, liver_features))
    maha = Mahalanobis(np.concatenate(train_feats))
    val_gate = np.array([detector.score_series(s).score for s, _ in val])
    val_maha = np.array([float(maha.distance(f).mean()) for _, f in val])
    log.info(
        "references: %d training series (%d liver slices) for Mahalanobis, %d validation series for z-scores",
        len(train_feats),
        sum(len(f) for f in train_feats),
        len(val),
    )
    return {
        "mahalanobis": maha,
        "z": {
            "gate": (float(val_gate.mean()), float(val_gate.std() + 1e-9)),
            "mahalanobis": (float(val_maha.mean()), float(val_maha.std() + 1e-9)),
        },
    }


def score_series(
    root: Path, splits: set[str] | None, segmenter: Segmenter, detector: Detector, reference: dict[str, Any]
) -> list[SeriesResult]:
    from service import dicom_series
    from service.segmentation import dice

    groups, contours, entries = _contoured_series(root, splits)
    if not groups:
        raise ValueError(
            f"{root}: no CT series with a liver contour" + (f" in split {sorted(splits)}" if splits else "")
        )
    results = []
    t0 = time.monotonic()
    for n, g in enumerate(groups, 1):
        try:
            series = dicom_series.load_series(g)
        except dicom_series.SeriesError as exc:
            log.warning("skipping %s", exc)
            continue
        truth = contours[g.series_instance_uid].volume_for(series)
        seg = segmenter.segment(series)
        gate = detector.score_series(series)
        assert seg.features is not None  # fit_reference checked that this segmenter has a features output
        maha = float(reference["mahalanobis"].distance(seg.features[_liver_slices(seg.mask)]).mean())
        (mg, sg), (mm, sm) = reference["z"]["gate"], reference["z"]["mahalanobis"]
        results.append(
            SeriesResult(
                series_instance_uid=g.series_instance_uid,
                folder=str(Path(g.folder).relative_to(root)),
                anomaly=_anomaly(entries.get(g.series_instance_uid)),
                num_slices=series.num_slices,
                dice=dice(seg.mask, truth),
                gate=gate.score,
                gate_flagged=gate.flagged,
                entropy=seg.entropy,
                mahalanobis=maha,
                combined=max((gate.score - mg) / sg, (maha - mm) / sm),
                liver_volume_ml=seg.liver_volume_ml,
            )
        )
        if n % 10 == 0 or n == len(groups):
            log.info("scored %d/%d series (%.0f s)", n, len(groups), time.monotonic() - t0)
    return results


# --- report --------------------------------------------------------------------------------------------


def build_report(results: list[SeriesResult], n_boot: int, meta: dict[str, Any]) -> dict[str, Any]:
    dice = np.array([r.dice for r in results])
    types = sorted({r.anomaly for r in results})
    report: dict[str, Any] = {
        "meta": meta,
        "series": len(results),
        "dice": {"all": _dice_stats(dice)},
        "failure_definitions": {},
    }
    for t in types:
        report["dice"][t] = _dice_stats(np.array([r.dice for r in results if r.anomaly == t]))
    for cut in (FAILURE_DICE, SECONDARY_FAILURE_DICE):
        block: dict[str, Any] = {
            "oracle_aurc": optimal_aurc(1 - dice),
            "random_aurc": float(np.mean(1 - dice)),
            "scores": {},
        }
        for name in SCORES:
            s = np.array([getattr(r, name) for r in results])
            block["scores"][name] = score_summary(s, dice, cut, n_boot if cut == FAILURE_DICE else 0)
        failed = dice < cut
        gate_flag = np.array([r.gate_flagged for r in results])
        block["gate_at_threshold"] = {
            "review_rate": float(gate_flag.mean()),
            "recall": float((failed & gate_flag).sum() / failed.sum()) if failed.any() else float("nan"),
            "residual_failure_rate": float(failed[~gate_flag].mean()) if (~gate_flag).any() else 0.0,
        }
        per_type = {}
        for t in types:
            sel = np.array([r.anomaly == t for r in results])
            k = int(np.ceil(TARGET_REVIEW_RATE * len(results) - 1e-9))
            row = {"series": int(sel.sum()), "failures": int((failed & sel).sum())}
            for name in SCORES:
                s = np.array([getattr(r, name) for r in results])
                top = np.zeros(len(results), bool)
                top[np.argsort(-s, kind="mergesort")[:k]] = True
                row[f"{name}_caught_at_15"] = int((failed & sel & top).sum())
            row["gate_flagged"] = int((gate_flag & sel).sum())
            per_type[t] = row
        block["per_type"] = per_type
        report["failure_definitions"][f"dice<{cut}"] = block
    main = report["failure_definitions"][f"dice<{FAILURE_DICE}"]
    best_recall = {
        name: next(r["recall"] for r in main["scores"][name]["review"] if r["review_rate"] == TARGET_REVIEW_RATE)
        for name in SCORES
    }
    report["targets"] = {
        "segmenter_dice_normal_ge_0.95": report["dice"].get("normal", {}).get("mean", float("nan")) >= 0.95,
        "gate_recall_at_15pct_ge_0.95": best_recall["gate"] >= TARGET_RECALL,
        "combined_recall_at_15pct_ge_0.95": best_recall["combined"] >= TARGET_RECALL,
        "gate_aurc_le_mahalanobis": main["scores"]["gate"]["aurc"] <= main["scores"]["mahalanobis"]["aurc"],
        "combined_aurc_le_mahalanobis": main["scores"]["combined"]["aurc"] <= main["scores"]["mahalanobis"]["aurc"],
    }
    return report


def _dice_stats(d: np.ndarray) -> dict[str, float]:
    if d.size == 0:
        return {"series": 0}
    return {
        "series": int(d.size),
        "mean": float(d.mean()),
        "median": float(np.median(d)),
        "min": float(d.min()),
        "below_0.95": int((d < 0.95).sum()),
        "below_0.90": int((d < 0.90).sum()),
    }


def _f(v: float, nd: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{nd}f}"


def report_markdown(report: dict[str, Any], plots: list[str]) -> str:
    m = report["meta"]
    lines = [
        f"# Gate evaluation: does the gate catch the segmenter's failures? ({m['data']})",
        "",
        f"- Series: {report['series']} (split {m['splits']}); segmenter `{m['segmenter']}` "
        f"(version {m['segmenter_version']}); detector `{m['detector']}` (threshold {m['detector_threshold']:.4f}).",
        f"- Command: `{m['command']}`; scored in {m['seconds']:.0f} s on {m['machine']}.",
        "- Failure: 3-D liver Dice < 0.95 against the contour (also < 0.90 below). Risk = 1 − Dice.",
        "- Scores: `gate` = GAN detector series score; `entropy` = segmenter mean entropy around its liver; "
        "`mahalanobis` = bottleneck-feature Mahalanobis distance (fitted on normal training liver slices); "
        "`combined` = max of gate and Mahalanobis z-scores (z on validation normals).",
        "",
        "## Segmenter Dice by series type",
        "",
        "| type | series | mean | median | min | < 0.95 | < 0.90 |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, d in report["dice"].items():
        if d.get("series"):
            lines.append(
                f"| {t} | {d['series']} | {_f(d['mean'])} | {_f(d['median'])} | {_f(d['min'])} | "
                f"{d['below_0.95']} | {d['below_0.90']} |"
            )
    for key, block in report["failure_definitions"].items():
        lines += [
            "",
            f"## Failure = {key}",
            "",
            f"Oracle AURC {_f(block['oracle_aurc'], 4)}, random order {_f(block['random_aurc'], 4)} (lower is better).",
            "",
            "| score | failures | AUROC [95 % CI] | AUPRC | AURC [95 % CI] | recall @10 % | @15 % | @20 % | @30 % | "
            "failure rate among auto-routed @15 % |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, s in block["scores"].items():
            rec = {r["review_rate"]: r for r in s["review"]}
            ci = f" [{_f(s['auroc_ci'][0])}, {_f(s['auroc_ci'][1])}]" if "auroc_ci" in s else ""
            aci = f" [{_f(s['aurc_ci'][0], 4)}, {_f(s['aurc_ci'][1], 4)}]" if "aurc_ci" in s else ""
            lines.append(
                f"| {name} | {s['failures']}/{s['series']} | {_f(s['auroc'])}{ci} | {_f(s['auprc'])} | "
                f"{_f(s['aurc'], 4)}{aci} | "
                + " | ".join(_f(rec[r]["recall"], 2) for r in REVIEW_RATES)
                + f" | {_f(rec[0.15]['residual_failure_rate'], 3)} |"
            )
        g = block["gate_at_threshold"]
        lines += [
            "",
            f"Gate at its calibrated threshold: reviews {_f(g['review_rate'] * 100, 1)} % of series, catches "
            f"{_f(g['recall'] * 100 if g['recall'] == g['recall'] else float('nan'), 1)} % of failures; failure rate "
            f"among auto-routed {_f(g['residual_failure_rate'] * 100, 1)} %.",
            "",
            "| type | series | failures | gate flagged | caught @15 %: gate | entropy | mahalanobis | combined |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t, row in block["per_type"].items():
            lines.append(
                f"| {t} | {row['series']} | {row['failures']} | {row['gate_flagged']} | "
                + " | ".join(str(row[f"{n}_caught_at_15"]) for n in SCORES)
                + " |"
            )
    t = report["targets"]
    lines += [
        "",
        "## Targets",
        "",
        f"- Segmenter Dice ≥ 0.95 on unseen normal series: **{'met' if t['segmenter_dice_normal_ge_0.95'] else 'missed'}**.",
        f"- Gate catches ≥ 95 % of failures at ≤ 15 % review: **{'met' if t['gate_recall_at_15pct_ge_0.95'] else 'missed'}** "
        f"(combined score: {'met' if t['combined_recall_at_15pct_ge_0.95'] else 'missed'}).",
        f"- Gate AURC ≤ Mahalanobis AURC: **{'met' if t['gate_aurc_le_mahalanobis'] else 'missed'}** "
        f"(combined: {'met' if t['combined_aurc_le_mahalanobis'] else 'missed'}).",
        "",
    ]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_plots(results: list[SeriesResult], report: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dice = np.array([r.dice for r in results])
    risk = 1 - dice
    names = []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    n = dice.size
    for name in SCORES:
        s = np.array([getattr(r, name) for r in results])
        order = np.argsort(s, kind="mergesort")
        axes[0].plot(np.arange(1, n + 1) / n, np.cumsum(risk[order]) / np.arange(1, n + 1), label=name)
        failed = dice < FAILURE_DICE
        rates = np.linspace(0, 1, 101)
        axes[1].plot(rates * 100, [review_outcome(s, failed, r)["recall"] for r in rates], label=name)
    axes[0].plot(np.arange(1, n + 1) / n, np.cumsum(np.sort(risk)) / np.arange(1, n + 1), "k:", label="oracle")
    axes[0].set(xlabel="coverage (fraction auto-routed)", ylabel="risk (mean 1 − Dice)", title="Risk–coverage")
    axes[1].axvline(15, color="grey", ls="--")
    axes[1].axhline(0.95, color="grey", ls="--")
    axes[1].set(
        xlabel="review rate (%)", ylabel="recall of failures (Dice < 0.95)", title="Failures caught vs review load"
    )
    types = sorted({r.anomaly for r in results})
    for i, t in enumerate(types):
        d = [r.dice for r in results if r.anomaly == t]
        axes[2].scatter(np.full(len(d), i) + np.random.default_rng(i).uniform(-0.15, 0.15, len(d)), d, s=10)
    axes[2].axhline(FAILURE_DICE, color="red", ls="--", lw=1)
    axes[2].set_xticks(range(len(types)), types, rotation=30, ha="right")
    axes[2].set(ylabel="liver Dice", title="Segmenter Dice by series type", ylim=(max(0.0, dice.min() - 0.05), 1.0))
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gate_curves.png", dpi=110)
    plt.close(fig)
    names.append("gate_curves.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, name in zip(axes, ("gate", "mahalanobis")):
        for t in types:
            sel = [r for r in results if r.anomaly == t]
            ax.scatter([getattr(r, name) for r in sel], [r.dice for r in sel], s=10, label=t)
        ax.axhline(FAILURE_DICE, color="red", ls="--", lw=1)
        ax.set(xlabel=f"{name} score", ylabel="liver Dice", title=f"Dice vs {name} score")
    axes[0].axvline(report["meta"]["detector_threshold"], color="grey", ls="--", lw=1)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dice_vs_score.png", dpi=110)
    plt.close(fig)
    names.append("dice_vs_score.png")
    return names


def run(args: argparse.Namespace) -> int:
    import platform
    import shlex
    import sys

    from service.inference import Detector
    from service.segmentation import DEFAULT_MODEL_DIR as DEFAULT_SEGMENTER
    from service.segmentation import Segmenter

    if args.feedback:
        return run_feedback(args)
    if args.data is None or args.out is None:
        raise UsageError("--data and --out are needed (or --feedback for the dosimetrists' verdicts)")
    if not args.data.is_dir():
        raise UsageError(f"--data {args.data}: no such folder")
    splits = set(args.split.split(",")) if args.split else {"test", "test_large"}
    train_root = args.train_data or args.data
    args.out.mkdir(parents=True, exist_ok=True)
    seg_dir, det_dir = args.segmenter or DEFAULT_SEGMENTER, args.detector or DEFAULT_DETECTOR_DIR
    try:
        segmenter, detector = Segmenter(seg_dir), Detector(det_dir)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise UsageError(f"model: {exc}") from None
    cache = args.out / "series.json"
    t0 = time.monotonic()
    if args.reuse and cache.is_file():
        saved = json.loads(cache.read_text())
        results = [SeriesResult(**r) for r in saved["results"]]
        seconds = saved["seconds"]
    else:
        try:
            reference = fit_reference(train_root, segmenter, detector)
            results = score_series(args.data, splits, segmenter, detector, reference)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        seconds = time.monotonic() - t0
        cache.write_text(json.dumps({"seconds": seconds, "results": [asdict(r) for r in results]}, indent=1))
    meta = {
        "data": str(args.data),
        "splits": ",".join(sorted(splits)),
        "segmenter": str(seg_dir),
        "segmenter_version": segmenter.version,
        "detector": str(det_dir),
        "detector_threshold": detector.threshold,
        "seconds": seconds,
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "command": "gatekeeper evaluate gate " + " ".join(shlex.quote(a) for a in sys.argv[3:]),
    }
    report = build_report(results, args.bootstrap, meta)
    plots = write_plots(results, report, args.out)
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (args.out / "report.md").write_text(report_markdown(report, plots))
    main = report["failure_definitions"][f"dice<{FAILURE_DICE}"]
    print(
        f"{len(results)} series, {main['scores']['gate']['failures']} failures (Dice < {FAILURE_DICE}); "
        + ", ".join(f"{n}: AUROC {_f(s['auroc'])} AURC {_f(s['aurc'], 4)}" for n, s in main["scores"].items())
        + f"; report in {args.out / 'report.md'}"
    )
    return 0


# --- the dosimetrists' verdicts as labels (--feedback) ---------------------------------------------------

#: Gate signals stored in the database: name → (what it is, its value for a label; None: unknown).
FEEDBACK_SIGNALS: dict[str, tuple[str, Callable[[FeedbackLabel], float | None]]] = {
    "detector_score": (
        "detector series score ÷ its threshold",
        lambda lab: (
            lab.detector_score / lab.detector_threshold
            if lab.detector_score is not None and lab.detector_threshold
            else None
        ),
    ),
    "detector_flagged": (
        "detector flag (score above threshold)",
        lambda lab: None if lab.detector_flagged is None else float(lab.detector_flagged),
    ),
    "geometry_findings": (
        "any ingest geometry finding",
        lambda lab: None if lab.geometry_findings is None else float(lab.geometry_findings > 0),
    ),
    "routed_to_worklist": (
        "the route the pipeline took was the worklist",
        lambda lab: None if lab.route is None else float(lab.route == "worklist"),
    ),
}


def feedback_report(labels: list[FeedbackLabel]) -> dict[str, Any]:
    """Agreement of each gate signal with the dosimetrists' verdicts (`no` = failure = positive class).

    Uses the newest verdict per series version and leaves `not_applicable` out. Per signal: how many
    labelled series have a value for it, the `no`/`yes` counts among them, the AUROC for `no` (NaN
    unless both occur; for a yes/no signal it is the mean of its recall of `no` and of `yes`), and for
    yes/no signals the series it sent to manual contouring among the `no` and the `yes` verdicts.
    """
    from service.feedback import latest_per_series

    latest = latest_per_series(labels)
    judged = [lab for lab in latest if lab.verdict in ("yes", "no")]
    signals: dict[str, Any] = {}
    for name, (meaning, value_of) in FEEDBACK_SIGNALS.items():
        pairs = [(value_of(lab), lab.verdict == "no") for lab in judged]
        known = [(v, failed) for v, failed in pairs if v is not None]
        fail = np.array([v for v, failed in known if failed], np.float64)
        ok = np.array([v for v, failed in known if not failed], np.float64)
        entry: dict[str, Any] = {
            "meaning": meaning,
            "series": len(known),
            "no": int(fail.size),
            "yes": int(ok.size),
            "auroc_no": auroc(ok, fail),
        }
        if name != "detector_score":  # a yes/no signal: what it sent to manual contouring
            entry["stopped_no"] = int((fail > 0).sum())
            entry["stopped_yes"] = int((ok > 0).sum())
        signals[name] = entry
    return {
        "verdicts": len(labels),
        "series": len(latest),
        "no": sum(lab.verdict == "no" for lab in latest),
        "yes": sum(lab.verdict == "yes" for lab in latest),
        "not_applicable": sum(lab.verdict == "not_applicable" for lab in latest),
        "signals": signals,
    }


def feedback_summary(report: dict[str, Any]) -> str:
    """The report as lines for a person (what `--feedback` prints)."""
    if report["verdicts"] == 0:
        return (
            "no feedback recorded yet: dosimetrists record 'auto contour acceptable: yes / no / not applicable' "
            "on the series pages of the worklist; then run this again"
        )
    lines = [
        f"{report['verdicts']} verdicts on {report['series']} series versions (newest per series counts): "
        f"{report['no']} no (failure), {report['yes']} yes, {report['not_applicable']} not applicable (left out)"
    ]
    if report["no"] == 0 or report["yes"] == 0:
        lines.append("AUROC needs both 'no' and 'yes' verdicts; only counts for now")
    lines.append(f"{'signal':<20} {'series':>6} {'no':>4} {'yes':>4} {'AUROC(no)':>9}  stopped no / yes")
    for name, s in report["signals"].items():
        stopped = f"{s['stopped_no']}/{s['no']} / {s['stopped_yes']}/{s['yes']}" if "stopped_no" in s else "-"
        lines.append(f"{name:<20} {s['series']:>6} {s['no']:>4} {s['yes']:>4} {_f(s['auroc_no']):>9}  {stopped}")
    return "\n".join(lines)


def run_feedback(args: argparse.Namespace) -> int:
    """`evaluate gate --feedback`: read the verdicts from the configured database and report per signal.

    Raises:
        DatabaseNotReady: the database does not answer or is not migrated (one line, exit 2).
    """
    from service.db.schema import open_database
    from service.feedback import feedback_labels
    from service.settings import load_settings_or_exit

    if args.data is not None:
        raise UsageError("--feedback takes its labels from the database; leave out --data")
    settings = load_settings_or_exit()
    with open_database(settings) as sessions, sessions() as session:
        labels = feedback_labels(session=session)
    report = feedback_report(labels)
    print(feedback_summary(report))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "feedback_report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    return 0
