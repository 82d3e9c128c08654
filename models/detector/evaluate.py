"""`gatekeeper evaluate detector`: score a phantom test split with an exported detector and report.

Uses the same ONNX Runtime path as `gatekeeper score` (no torch). Needs the phantom
`manifest.json` for ground truth: anomaly type per series and affected slice indices.

Reports (report.json, report.md in --out): series-level AUROC and AUPRC per anomaly type and
overall with bootstrap 95 % CIs, slice-level AUROC (anomalous slices of anomalous series vs all
slices of normal series), and the false-flag rate of the unseen normal series at the calibrated
threshold. Not yet here: the baselines (unconditioned ablation, autoencoder, HU histogram), the
localisation score and the plots that issue 4 asks for.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def register(what: argparse._SubParsersAction) -> None:
    d = what.add_parser("detector", help="evaluate an exported detector on a phantom test split",
                        description="Score the test series of a phantom run (manifest.json) and write report.json "
                        "and report.md to --out.")
    d.add_argument("--data", required=True, type=Path, help="phantom run folder with manifest.json")
    d.add_argument("--model", required=True, type=Path, help="model folder (model.json + ONNX files)")
    d.add_argument("--out", required=True, type=Path, help="report folder")
    d.add_argument("--split", default="test", help="manifest split to evaluate (default test)")
    d.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    d.set_defaults(func=run)


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    neg, pos = np.asarray(neg, float).ravel(), np.asarray(pos, float).ravel()
    if neg.size == 0 or pos.size == 0:
        return float("nan")
    order = np.argsort(np.concatenate([neg, pos]), kind="mergesort")
    ranks = np.empty(order.size)
    values = np.concatenate([neg, pos])[order]
    # average ranks over ties
    i = 0
    while i < values.size:
        j = i
        while j + 1 < values.size and values[j + 1] == values[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[neg.size:].sum()
    return float((r_pos - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def auprc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Average precision with the anomalous series as positives."""
    scores = np.concatenate([neg, pos])
    labels = np.concatenate([np.zeros(len(neg)), np.ones(len(pos))])
    order = np.argsort(-scores, kind="mergesort")
    labels = labels[order]
    tp = np.cumsum(labels)
    precision = tp / np.arange(1, labels.size + 1)
    return float((precision * labels).sum() / max(labels.sum(), 1))


def bootstrap_ci(metric, neg: np.ndarray, pos: np.ndarray, n: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    vals = [metric(rng.choice(neg, neg.size), rng.choice(pos, pos.size)) for _ in range(n)]
    return [round(float(v), 4) for v in np.nanpercentile(vals, [2.5, 97.5])]


def evaluate(data: Path, model: Path, split: str = "test", n_boot: int = 1000) -> dict:
    from service import dicom_series
    from service.inference import Detector

    manifest = json.loads((data / "manifest.json").read_text())
    entries = [e for e in manifest["series"] if e.get("split") == split]
    if not entries:
        raise ValueError(f"{data}/manifest.json has no series in split {split!r}")
    detector = Detector(model)
    rows = []
    t0 = time.monotonic()
    for e in entries:
        groups = dicom_series.ct_series_in(dicom_series.scan_tree(data / e["folder"]))
        (group,) = [g for g in groups if g.series_instance_uid == e["series_instance_uid"]]
        result = detector.score_series(dicom_series.load_series(group))
        kind = e["anomaly"]["type"] if e.get("anomaly") else "normal"
        affected = set(e["anomaly"]["slices"]) if e.get("anomaly") else set()
        rows.append({"folder": e["folder"], "type": kind, "score": result.score, "flagged": result.flagged,
                     "slice_scores": [s.score for s in result.slices], "affected": sorted(affected)})
    seconds = time.monotonic() - t0
    normal = np.array([r["score"] for r in rows if r["type"] == "normal"])
    types = sorted({r["type"] for r in rows} - {"normal"})
    report: dict = {"data": str(data), "model": str(model), "split": split, "threshold": detector.threshold,
                    "aggregation": detector.aggregation, "provider": detector.provider,
                    "series": len(rows), "seconds": round(seconds, 1), "per_type": {}}
    for kind in types + ["all"]:
        pos = np.array([r["score"] for r in rows if r["type"] != "normal" and (kind == "all" or r["type"] == kind)])
        report["per_type"][kind] = {
            "n": int(pos.size), "auroc": round(auroc(normal, pos), 4),
            "auroc_ci95": bootstrap_ci(auroc, normal, pos, n_boot),
            "auprc": round(auprc(normal, pos), 4),
            "sensitivity_at_threshold": round(float(np.mean(pos > detector.threshold)), 4),
        }
    slice_neg = np.concatenate([r["slice_scores"] for r in rows if r["type"] == "normal"])
    slice_pos = np.concatenate([np.asarray(r["slice_scores"])[r["affected"]] for r in rows if r["affected"]])
    report["slice_auroc"] = round(auroc(slice_neg, slice_pos), 4)
    report["false_flag_rate_normals"] = round(float(np.mean(normal > detector.threshold)), 4)
    model_meta = json.loads((model / "model.json").read_text())
    report["position_quality_validation"] = model_meta.get("metrics", {}).get("position_quality_validation", {})
    report["model_training"] = {k: model_meta.get("training", {}).get(k) for k in ("command", "device_name", "steps")}
    report["rows"] = [{k: v for k, v in r.items() if k not in ("slice_scores", "affected")} for r in rows]
    return report


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Detector evaluation — {report['split']} split of {report['data']}", "",
             f"Model `{report['model']}`, aggregation `{report['aggregation']}`, threshold {report['threshold']:.4g}, "
             f"{report['series']} series scored in {report['seconds']} s ({report['provider']}).", "",
             "| anomaly | n | series AUROC (95 % CI) | AUPRC | sensitivity at threshold |", "|---|---|---|---|---|"]
    for kind, m in report["per_type"].items():
        lines.append(f"| {kind} | {m['n']} | {m['auroc']:.3f} ({m['auroc_ci95'][0]:.3f}–{m['auroc_ci95'][1]:.3f}) | "
                     f"{m['auprc']:.3f} | {m['sensitivity_at_threshold']:.2f} |")
    lines += ["", f"Slice-level AUROC: {report['slice_auroc']:.3f}. False-flag rate of unseen normal series at the "
              f"threshold: {report['false_flag_rate_normals']:.2f}.", ""]
    quality = report.get("position_quality_validation") or {}
    if quality:
        lines += ["Slice position vs the phantom's true body-axis position (validation series, after a linear fit):",
                  "",
                  "| position | Pearson r | RMSE |", "|---|---|---|"]
        lines += [f"| {k} | {v['pearson_r']:.3f} | {v['rmse_after_linear_fit']:.3f} |" for k, v in quality.items()]
        lines.append("")
    (out / "report.md").write_text("\n".join(lines))


def run(args: argparse.Namespace) -> int:
    from service.cli import UsageError

    try:
        report = evaluate(args.data, args.model, args.split, args.bootstrap)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    write_report(report, args.out)
    print((args.out / "report.md").read_text())
    return 0
