"""report.json and curve.png of the label-efficiency experiment (`curve.py`)."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from models.active_learning.curve_runs import run_name


def bootstrap_ci(values: np.ndarray, n: int, seed: int = 0) -> list[float]:
    """95 % percentile bootstrap CI of the mean (rows resampled; [nan, nan] when empty)."""
    if values.size == 0:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    return [round(float(np.percentile(means, 2.5)), 5), round(float(np.percentile(means, 97.5)), 5)]


def summarise(
    dice: dict[str, list[float]], labels: dict[str, str], baseline: dict[str, float], n: int
) -> dict[str, Any]:
    """Mean Dice on failures, per type and on normals with CIs; normals' paired difference to the shipped model.

    `dice`: per test series (name) the Dice of each repeat (random: one per seed).
    """
    names = sorted(dice)
    per_series = np.array([np.mean(dice[s]) for s in names])
    failures = np.array([labels[s] != "normal" for s in names])
    out: dict[str, Any] = {
        "failures": {"dice": round(float(per_series[failures].mean()), 5), "ci": bootstrap_ci(per_series[failures], n)},
        "per_type": {},
    }
    for label in sorted(set(labels.values())):
        sel = np.array([labels[s] == label for s in names])
        out["per_type"][label] = {
            "n": int(sel.sum()),
            "dice": round(float(per_series[sel].mean()), 5),
            "ci": bootstrap_ci(per_series[sel], n),
        }
    normals = ~failures
    difference = per_series[normals] - np.array([baseline[s] for s, m in zip(names, normals) if m])
    out["normals_minus_shipped"] = {
        "mean": round(float(difference.mean()), 5) if difference.size else None,
        "ci": bootstrap_ci(difference, n),
    }
    return out


def labels_to_match(curves: dict[str, dict[str, Any]], target: float | None) -> dict[str, int | None]:
    """Per strategy the smallest K whose Dice reaches `target` (random's Dice at its largest K), else None."""
    out: dict[str, int | None] = {}
    for name, curve in curves.items():
        reached = [k for k, d in zip(curve["budgets"], curve["dice"]) if target is not None and d >= target]
        out[name] = min(reached) if reached else None
    return out


def figure(report: dict[str, Any], path: Path) -> None:
    """Dice on held-out failures vs labels, one line per strategy (95 % CI bars), the shipped model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    for name, curve in report["strategies"].items():
        cis = np.array(curve["ci"], float)
        dice = np.array(curve["dice"], float)
        ax.errorbar(
            curve["budgets"], dice, yerr=[dice - cis[:, 0], cis[:, 1] - dice], marker="o", capsize=3, label=name
        )
    ax.axhline(report["shipped"]["failures"]["dice"], color="grey", linestyle="--", label="shipped (0 labels)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(report["budgets"], [str(b) for b in report["budgets"]])
    ax.set_xlabel("manual contours (labels)")
    ax.set_ylabel("Dice on held-out failures")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(
    *,
    args: argparse.Namespace,
    opts: dict[str, Any],
    out: Path,
    results: dict[str, dict[str, Any]],
    shipped: dict[str, float],
    pool: list[dict[str, Any]],
    test: list[dict[str, Any]],
    wall_s: float,
) -> dict[str, Any]:
    """Write DIR/report.json and DIR/curve.png; return the report.

    `wall_s`: this invocation's wall time; `fine_tune_s` sums every run's own time, cached ones
    included, and `series_s` every series' render-and-score time (one process each; None when a
    series was cached by a version that did not time it), so a run continued after a stop still
    states what the whole experiment cost.

    `strategies[NAME]`: `budgets`, `dice` (mean Dice on the held-out failures; random: mean over its
    seeds per series), `ci` (95 % bootstrap over test series), `details` per budget (per type,
    normals, normals' paired difference to the shipped segmenter, the series chosen).
    """
    labels = {t["name"]: t["label"] for t in test}
    pool_labels = {p["name"]: p["label"] for p in pool}
    strategies: dict[str, Any] = {}
    for strategy in opts["strategies"]:
        curve: dict[str, Any] = {"budgets": [], "dice": [], "ci": [], "details": {}}
        for budget in opts["budgets"]:
            seeds = range(args.random_repeats if strategy == "random" else 1)
            rows = [results[run_name(strategy, s, budget)] for s in seeds]
            per_series = {name: [r["dice"][name] for r in rows] for name in rows[0]["dice"]}
            summary = summarise(per_series, labels, shipped, args.bootstrap)
            curve["budgets"].append(budget)
            curve["dice"].append(summary["failures"]["dice"])
            curve["ci"].append(summary["failures"]["ci"])
            chosen = [[pool_labels.get(c, "?") for c in r["chosen"]] for r in rows]
            curve["details"][str(budget)] = {**summary, "chosen_types": chosen}
        strategies[strategy] = curve
    shipped_summary = summarise(
        {name: [d] for name, d in shipped.items()},
        labels,
        shipped,
        args.bootstrap,
    )
    random_max = max(opts["budgets"])
    target = strategies["random"]["dice"][-1] if "random" in strategies else None
    report: dict[str, Any] = {
        "random_max_budget": random_max,
        "strategies": {
            name: {"budgets": c["budgets"], "dice": c["dice"], "ci": c["ci"], "details": c["details"]}
            for name, c in strategies.items()
        },
        "labels_to_match_random": labels_to_match(strategies, target),
        "measured_on": "mean 3-D Dice over the held-out anomalous series (failures), network resolution",
        "budgets": list(opts["budgets"]),
        "wall_s": round(wall_s, 1),
        "fine_tune_s": round(sum(r["seconds"] for r in results.values()), 1),
        "series_s": (
            round(sum(s["seconds"] for s in pool + test), 1) if all("seconds" in s for s in pool + test) else None
        ),
        "shipped": shipped_summary,
        "setup": {
            "pool_series": len(pool),
            "pool_types": {k: sum(1 for p in pool if p["label"] == k) for k in sorted({p["label"] for p in pool})},
            "test_series": len(test),
            "random_repeats": args.random_repeats,
            "steps": opts["steps"],
            "batch": args.batch,
            "lr": args.lr,
            "matrix": args.matrix,
            "quick": bool(args.quick),
            "seeds": "pool 4 000 000+, test 4 500 000+, replay 4 800 000+ (models/active_learning/curve_pool.py)",
            "command": " ".join(sys.argv),
            "machine": platform.processor() or platform.machine(),
        },
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    figure(report, out / "curve.png")
    return report
