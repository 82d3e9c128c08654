"""`gatekeeper evaluate detector --diagnose`: why a detector misses what a reader sees.

For anomalous phantom series (tumour, fluid, stent …) and the normal series beside them, this looks
at the detector the way a reader would and measures four things, each with a figure:

(a) **the model input at the lesion** — the anomaly's contrast against the tissue around it and
    the noise of that tissue, in the model's own input units (after windowing and resizing), and
    how many model pixels the anomaly covers;
(b) **reconstruction and residual** — the mean residual |x − G(E(x))| inside the anomaly against
    the mean residual of the whole body on the same slices (`residual_ratio` < 1: the anomaly is
    reconstructed *better* than the average body pixel, so no residual-based score can see it);
(c) **the score along the body axis** — where the series' top-scoring slices lie: on the anomaly
    (`top_slices_on_anomaly`), or at positions the normals' scans never reach (`top_slices_outside_
    normal_range`); every profile is drawn against the normals' band at the same position;
(d) **the scan range** — phantom series with an anomaly are forced to cover it, so their scan
    ranges differ from the normals'; the report gives the rank correlation of series score with
    the scan's extent, and the series AUROC again with only the slices inside the normals' range
    (if the AUROC falls, the score rode on the range, not on the anomaly).

Every family with an encoder and a generator, each scoring a case in its own `diagnosis.py` (picked
by model.json): the slice recipe (format 1) on its own input grid; the patch recipe (format 2)
on the slice's image grid at `PATCH_MAP_SIZE`² — the input shown in the patch model's liver window,
the reconstruction tiled from the patches' G(E(x)) (liver window, the overlapping patches averaged)
and the residual map tiled from the scorer's own map (its largest value where patches overlap),
both mapped from the body-centred field back onto the image.

Input: one or more phantom runs (`manifest.json` files anywhere under `--data`; their series
with an anomaly type and those without). Output in `--out`: report.json, report.md, figures.
Uses ONNX Runtime only (no torch), like `gatekeeper score`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, stats

from models.detector.diagnosis_inputs import Case, Scored
from models.detector.family import family_of, read_meta
from models.detector.metrics import auroc
from service.errors import UsageError

log = logging.getLogger(__name__)

#: Width of the ring of surrounding tissue the anomaly's contrast is measured against, model pixels.
RING_PX = 3


def find_cases(root: Path) -> list[Case]:
    """Every series of every phantom run (`manifest.json`) under `root`.

    Raises:
        UsageError: no manifest.json under `root`.
    """
    manifests = sorted(root.rglob("manifest.json"))
    if not manifests:
        raise UsageError(f"no phantom manifest.json under {root}; make series with `gatekeeper phantom`")
    cases = []
    for path in manifests:
        manifest = json.loads(path.read_text())
        for entry in manifest["series"]:
            anomaly = entry.get("anomaly") or {}
            kind = str(anomaly.get("type") or "normal")
            folder = path.parent / entry["folder"]
            seg = folder / anomaly["seg"] if anomaly.get("seg") else None
            cases.append(Case(folder, kind, tuple(int(i) for i in anomaly.get("slices", ())), seg))
    return cases


def lesion_contrast(
    image: np.ndarray, anomaly: np.ndarray, body: np.ndarray, ring_px: int = RING_PX
) -> dict[str, float]:
    """The anomaly's contrast in one model-input slice against the tissue around it.

    Returns {"contrast": |mean inside − mean of the ring|, "ring_noise": std of the ring, "cnr":
    contrast / ring_noise, "pixels": anomaly pixels}. The ring is the anomaly dilated by `ring_px`
    pixels, minus the anomaly, inside the body.

    Raises:
        ValueError: the anomaly mask is empty, or the ring has fewer than 2 pixels.
    """
    if not anomaly.any():
        raise ValueError("anomaly mask is empty on this slice; expected at least one pixel")
    ring = ndimage.binary_dilation(anomaly, iterations=ring_px) & ~anomaly & body
    if ring.sum() < 2:
        raise ValueError(f"the ring around the anomaly has {int(ring.sum())} pixels inside the body; expected >= 2")
    contrast = float(abs(image[anomaly].mean() - image[ring].mean()))
    noise = float(image[ring].std())
    return {"contrast": contrast, "ring_noise": noise, "cnr": contrast / max(noise, 1e-6), "pixels": int(anomaly.sum())}


def residual_ratio(residual_maps: np.ndarray, anomaly: np.ndarray, body: np.ndarray) -> float:
    """Mean residual inside the anomaly / mean residual in the body, over the affected slices.

    Below 1: the anomaly is reconstructed better than the average body pixel.

    Raises:
        ValueError: no affected slice.
    """
    affected = anomaly.any(axis=(1, 2))
    if not affected.any():
        raise ValueError("no slice is affected; expected an anomaly mask with at least one pixel")
    inside = float(residual_maps[anomaly].mean())
    everywhere = float(residual_maps[affected][body[affected]].mean())
    return inside / max(everywhere, 1e-9)


def top_slices(scores: np.ndarray, n: int = 3) -> np.ndarray:
    """Indices of the `n` highest slice scores (what a top-n series aggregation rides on)."""
    return np.argsort(scores)[::-1][: min(n, scores.size)]


def analyse(scored: list[Scored], aggregation: str) -> dict[str, Any]:
    """The four measurements (a)–(d) over every scored series; see the module docstring."""
    from service import imaging

    normals = [s for s in scored if s.case.kind == "normal"]
    if not normals:
        raise UsageError("the diagnosis needs normal series beside the anomalous ones (phantom without --anomaly)")
    lo = float(min(s.positions.min() for s in normals))
    hi = float(max(s.positions.max() for s in normals))
    per_series = []
    for s in scored:
        top = top_slices(s.scores)
        row: dict[str, Any] = {
            "folder": s.case.folder.name,
            "kind": s.case.kind,
            "series_score": s.series_score,
            "position_min": float(s.positions.min()),
            "position_max": float(s.positions.max()),
            "top_slices": [int(i) for i in top],
            "top_slices_outside_normal_range": int(sum(not lo <= s.positions[i] <= hi for i in top)),
        }
        inside = (s.positions >= lo) & (s.positions <= hi)
        row["series_score_in_normal_range"] = (
            imaging.aggregate_slice_scores(s.scores[inside], aggregation) if inside.any() else None
        )
        if s.anomaly is not None and s.anomaly.any():
            affected = np.flatnonzero(s.anomaly.any(axis=(1, 2)))
            t = int(affected[np.argmax(s.anomaly[affected].sum(axis=(1, 2)))])  # the largest cross-section
            try:
                row["input"] = lesion_contrast(s.images[t], s.anomaly[t], s.body[t])
            except ValueError:
                row["input"] = None
            row["residual_ratio"] = residual_ratio(s.residual_maps, s.anomaly, s.body)
            row["top_slices_on_anomaly"] = int(sum(i in set(affected.tolist()) for i in top))
            row["figure_slice"] = t
        per_series.append(row)
    kinds = sorted({r["kind"] for r in per_series if r["kind"] != "normal"})
    normal_scores = [r["series_score"] for r in per_series if r["kind"] == "normal"]
    normal_in_range = [r["series_score_in_normal_range"] for r in per_series if r["kind"] == "normal"]
    by_kind = {}
    for kind in kinds:
        rows = [r for r in per_series if r["kind"] == kind]
        inputs = [r["input"] for r in rows if r.get("input")]
        in_range = [r["series_score_in_normal_range"] for r in rows if r["series_score_in_normal_range"] is not None]
        by_kind[kind] = {
            "series": len(rows),
            "auroc": auroc(
                np.r_[normal_scores, [r["series_score"] for r in rows]],
                np.r_[np.zeros(len(normal_scores)), np.ones(len(rows))],
            ),
            "auroc_in_normal_range": auroc(
                np.r_[normal_in_range, in_range], np.r_[np.zeros(len(normal_in_range)), np.ones(len(in_range))]
            )
            if in_range
            else None,
            "residual_ratio_median": float(np.median([r["residual_ratio"] for r in rows])),
            "input_contrast_median": float(np.median([i["contrast"] for i in inputs])) if inputs else None,
            "input_cnr_median": float(np.median([i["cnr"] for i in inputs])) if inputs else None,
            "anomaly_pixels_median": float(np.median([i["pixels"] for i in inputs])) if inputs else None,
            "top_slices_on_anomaly": int(sum(r["top_slices_on_anomaly"] for r in rows)),
            "top_slices_outside_normal_range": int(sum(r["top_slices_outside_normal_range"] for r in rows)),
            "top_slices": int(sum(len(r["top_slices"]) for r in rows)),
        }
    extents = np.array([r["position_max"] - r["position_min"] for r in per_series])
    series_scores = np.array([r["series_score"] for r in per_series])
    rho = stats.spearmanr(extents, series_scores)
    return {
        "normal_position_range": [lo, hi],
        "scan_extent": {
            "normal_median": float(np.median([e for e, r in zip(extents, per_series) if r["kind"] == "normal"])),
            "anomalous_median": float(np.median([e for e, r in zip(extents, per_series) if r["kind"] != "normal"])),
            "spearman_score_vs_extent": float(rho.statistic),
            "spearman_p": float(rho.pvalue),
        },
        "by_kind": by_kind,
        "series": per_series,
    }


def write_figures(scored: list[Scored], analysis: dict[str, Any], out: Path) -> list[str]:
    """Input/reconstruction/residual panels, score profiles against the normals' band, scan ranges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    normals = [s for s in scored if s.case.kind == "normal"]
    examples = {}
    for s, row in zip(scored, analysis["series"]):
        if s.case.kind != "normal" and s.case.kind not in examples and "figure_slice" in row:
            examples[s.case.kind] = (s, row)
    # (a)+(b): what the model sees and what it reconstructs, at the anomaly's largest cross-section.
    if examples:
        fig, axes = plt.subplots(len(examples), 3, figsize=(9, 3 * len(examples)), squeeze=False)
        for ax_row, (kind, (s, row)) in zip(axes, sorted(examples.items())):
            t = row["figure_slice"]
            assert s.anomaly is not None
            panels = (
                (s.images[t], "model input", (-1, 1), "gray"),
                (s.reconstructions[t], "reconstruction G(E(x))", (-1, 1), "gray"),
                (s.residual_maps[t], f"residual (ratio in/body {row['residual_ratio']:.2f})", (0, 1), "inferno"),
            )
            for ax, (image, title, (vmin, vmax), cmap) in zip(ax_row, panels):
                ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax)
                ax.contour(s.anomaly[t], levels=[0.5], colors="cyan", linewidths=0.8)
                ax.set_title(f"{kind}, slice {t}: {title}", fontsize=8)
                ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "input_reconstruction_residual.png", dpi=110)
        plt.close(fig)
        names.append("input_reconstruction_residual.png")
    # (c): slice scores along the body against the normals' band at the same position.
    if examples:
        low, high = analysis["normal_position_range"]
        grid = np.linspace(float(low), float(high), 21)
        pos = np.concatenate([s.positions for s in normals])
        sc = np.concatenate([s.scores for s in normals])
        bins = np.clip(np.digitize(pos, grid) - 1, 0, len(grid) - 2)
        centres = (grid[:-1] + grid[1:]) / 2
        lo_band = np.array(
            [np.percentile(sc[bins == b], 5) if (bins == b).any() else np.nan for b in range(len(centres))]
        )
        hi_band = np.array(
            [np.percentile(sc[bins == b], 95) if (bins == b).any() else np.nan for b in range(len(centres))]
        )
        fig, axes = plt.subplots(len(examples), 1, figsize=(8, 2.6 * len(examples)), squeeze=False)
        for ax, (kind, (s, _)) in zip(axes[:, 0], sorted(examples.items())):
            ax.fill_between(centres, lo_band, hi_band, color="0.85", label="normals 5–95 %")
            ax.plot(s.positions, s.scores, ".-", color="C0", label=f"{kind} series")
            affected = list(s.case.affected)
            ax.plot(s.positions[affected], s.scores[affected], "o", color="C3", label="anomaly slices")
            ax.axvspan(*analysis["normal_position_range"], color="C2", alpha=0.06, label="normals' range")
            ax.set_xlabel("position along the body (model units)")
            ax.set_ylabel("slice score")
            ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(out / "score_profiles.png", dpi=110)
        plt.close(fig)
        names.append("score_profiles.png")
    # (d): scan ranges and the series score.
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, row in enumerate(sorted(analysis["series"], key=lambda r: (r["kind"], r["position_min"]))):
        colour = "0.4" if row["kind"] == "normal" else "C3"
        left.plot([row["position_min"], row["position_max"]], [i, i], color=colour, lw=3)
    left.set_title("scan range per series (grey normal, red anomalous)", fontsize=9)
    left.set_xlabel("position along the body")
    left.set_yticks([])
    for kind in sorted({r["kind"] for r in analysis["series"]}):
        rows = [r for r in analysis["series"] if r["kind"] == kind]
        right.scatter(
            [r["position_max"] - r["position_min"] for r in rows], [r["series_score"] for r in rows], label=kind, s=18
        )
    right.set_xlabel("scan extent (position units)")
    right.set_ylabel("series score")
    right.set_title(f"Spearman ρ = {analysis['scan_extent']['spearman_score_vs_extent']:.2f}", fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scan_range.png", dpi=110)
    plt.close(fig)
    names.append("scan_range.png")
    return names


def conclusions(analysis: dict[str, Any]) -> list[str]:
    """Plain-language findings, each derived from a number in `analysis` (none hard-coded)."""
    lines = []
    for kind, k in sorted(analysis["by_kind"].items()):
        if k["residual_ratio_median"] < 1:
            lines.append(
                f"**{kind}**: the anomaly is reconstructed *better* than the average body pixel (residual "
                f"inside / body = {k['residual_ratio_median']:.2f}): a residual-based score cannot see it."
            )
        else:
            lines.append(
                f"**{kind}**: residual inside the anomaly is {k['residual_ratio_median']:.2f}× the body's mean."
            )
        if k["input_cnr_median"] is not None:
            lines.append(
                f"  In the model input it covers a median {k['anomaly_pixels_median']:.0f} pixels with contrast "
                f"{k['input_contrast_median']:.2f} against the tissue around it, {k['input_cnr_median']:.1f}× that "
                "tissue's noise."
            )
        lines.append(
            f"  Of its series' top-3 slices, {k['top_slices_on_anomaly']} of {k['top_slices']} lie on the anomaly and "
            f"{k['top_slices_outside_normal_range']} at positions the normals never reach; series AUROC "
            f"{k['auroc']:.2f}, {_fmt(k['auroc_in_normal_range'])} with only slices inside the normals' range."
        )
    extent = analysis["scan_extent"]
    lines.append(
        f"**Scan range**: anomalous series span a median {extent['anomalous_median']:.2f} position units, normals "
        f"{extent['normal_median']:.2f}; series score vs extent Spearman ρ = {extent['spearman_score_vs_extent']:.2f} "
        f"(p = {extent['spearman_p']:.3f})."
    )
    return lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def report_markdown(analysis: dict[str, Any], figures: list[str], command: str, wall_s: float) -> str:
    rows = [
        "| type | series | AUROC | AUROC, normals' range only | residual in/body | input contrast | CNR | pixels | top-3 on anomaly | top-3 outside range |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, k in sorted(analysis["by_kind"].items()):
        rows.append(
            f"| {kind} | {k['series']} | {k['auroc']:.2f} | {_fmt(k['auroc_in_normal_range'])} | "
            f"{k['residual_ratio_median']:.2f} | {_fmt(k['input_contrast_median'])} | {_fmt(k['input_cnr_median'])} | "
            f"{_fmt(k['anomaly_pixels_median'])} | {k['top_slices_on_anomaly']}/{k['top_slices']} | "
            f"{k['top_slices_outside_normal_range']}/{k['top_slices']} |"
        )
    return "\n".join(
        [
            "# Detector diagnosis",
            "",
            f"Command: `{command}` ({wall_s:.0f} s). Medians over series; contrast and noise in model-input units "
            "([-1, 1] after windowing and resizing).",
            "",
            *rows,
            "",
            "## Findings",
            "",
            *[f"- {line}" if not line.startswith("  ") else f"  {line.strip()}" for line in conclusions(analysis)],
            "",
            "## Figures",
            "",
            *[f"![{name}]({name})" for name in figures],
            "",
        ]
    )


def run(*, data: Path, model: Path, out: Path, command: str) -> dict[str, Any]:
    """Diagnose the detector in `model` on every phantom series under `data`; write the report to `out`.

    Raises:
        ValueError: the model's family has no diagnosis, or a case cannot be read (messages name it).
    """
    start = time.monotonic()
    family = family_of(read_meta(model))
    if family.diagnose is None:
        raise ValueError(f"{model}: the {family.name} family has no diagnosis (it has no encoder and generator)")
    score_case, aggregation = family.diagnose(model)
    cases = find_cases(data)
    scored = []
    for i, case in enumerate(cases, 1):
        log.info("diagnosis: series %d/%d (%s)", i, len(cases), case.kind)
        scored.append(score_case(case))
    analysis = analyse(scored, aggregation)
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(scored, analysis, out)
    wall_s = time.monotonic() - start
    analysis.update({"command": command, "model": str(model), "wall_s": round(wall_s, 1)})
    (out / "report.json").write_text(json.dumps(analysis, indent=1, default=float))
    (out / "report.md").write_text(report_markdown(analysis, figures, command, wall_s))
    return analysis
