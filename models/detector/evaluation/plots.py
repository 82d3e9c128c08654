"""The evaluation's figures: ROC curves per anomaly type, slice-score profiles, evidence heat maps."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from models.detector.evaluation.localisation import LOCALISATION_SIGMA_PX
from models.detector.evaluation.run import Example
from models.detector.metrics import roc_curve


def write_plots(report: dict[str, Any], examples: list[Example], out: Path) -> list[str]:
    """roc.png, profiles.png, heatmaps.png in `out`; returns the file names written."""
    from matplotlib.figure import Figure

    written = []
    methods = report["methods"]
    rows = report["rows"]
    kinds = list(methods["detector"]["per_type"])
    cols = min(4, len(kinds))
    nrows = -(-len(kinds) // cols)
    fig = Figure(figsize=(3.2 * cols, 3.2 * nrows), layout="constrained")
    for i, kind in enumerate(kinds):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for name, m in methods.items():
            neg = [r["scores"][name] for r in rows if r["type"] == "normal"]
            pos = [r["scores"][name] for r in rows if r["type"] != "normal" and kind in ("all", r["type"])]
            fpr, tpr = roc_curve(np.array(neg), np.array(pos))
            ax.plot(fpr, tpr, label=f"{name} {m['per_type'][kind]['auroc']:.2f}")
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
        ax.set_title(f"{kind} (n={methods['detector']['per_type'][kind]['n']})", fontsize=9)
        ax.set_xlabel("false-positive rate", fontsize=8)
        ax.set_ylabel("true-positive rate", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
    # Panels name the methods by their short keys; the labels (long for --compare models) once, below.
    fig.supxlabel("\n".join(f"{name}: {m['label']}" for name, m in methods.items()), fontsize=7, ha="left", x=0.01)
    fig.savefig(out / "roc.png", dpi=110)
    written.append("roc.png")

    if examples:
        fig = Figure(figsize=(8, 1.9 * len(examples)), layout="constrained")
        for i, ex in enumerate(examples):
            ax = fig.add_subplot(len(examples), 1, i + 1)
            ax.plot(np.arange(ex.slice_scores.size), ex.slice_scores, lw=1.0, color="k")
            for run_start, run_end in _runs(ex.affected):
                ax.axvspan(run_start - 0.5, run_end + 0.5, color="tab:red", alpha=0.25, lw=0)
            ax.axhline(report["threshold"], color="tab:blue", ls="--", lw=0.8, label="series threshold")
            if i == 0:
                ax.legend(fontsize=7, loc="upper left")
            ax.set_title(f"{ex.type}: {ex.folder}", fontsize=8)
            ax.set_ylabel("slice score", fontsize=7)
            ax.tick_params(labelsize=7)
        ax.set_xlabel("slice (head → feet)", fontsize=8)
        fig.savefig(out / "profiles.png", dpi=110)
        written.append("profiles.png")

    located = [ex for ex in examples if ex.panels]
    if located:
        cols = 1 + max(len(ex.panels) for ex in located)
        fig = Figure(figsize=(2.6 * cols, 2.6 * len(located)), layout="constrained")
        for i, ex in enumerate(located):
            first = ex.panels[0]
            ax = fig.add_subplot(len(located), cols, i * cols + 1)
            ax.imshow(first.image, cmap="gray", vmin=-1, vmax=1)
            ax.contour(first.anomaly, levels=[0.5], colors="cyan", linewidths=0.7)
            ax.set_title(f"{ex.type}, slice {first.localisation['slice']}", fontsize=8)
            ax.axis("off")
            for j, panel in enumerate(ex.panels):
                loc = panel.localisation
                r, c = loc["argmax"]
                ax = fig.add_subplot(len(located), cols, i * cols + 2 + j)
                ax.imshow(ndimage.gaussian_filter(panel.residual.astype(np.float64), LOCALISATION_SIGMA_PX), cmap="hot")
                ax.contour(panel.anomaly, levels=[0.5], colors="cyan", linewidths=0.7)
                ax.plot([c], [r], marker="x", color="lime", ms=8, mew=2)
                verdict = "hit" if loc["hit"] else "miss"
                ax.set_title(f"{textwrap.fill(panel.label, 30)}\nslice {loc['slice']}: {verdict}", fontsize=6)
                ax.axis("off")
        fig.savefig(out / "heatmaps.png", dpi=110)
        written.append("heatmaps.png")
    return written


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs (first, last) of sorted slice indices."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs
