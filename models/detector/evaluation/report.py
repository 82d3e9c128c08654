"""report.md of a detector evaluation, section by section, from report.json."""

from __future__ import annotations

from typing import Any

from models.detector.evaluation.localisation import LOCALISATION_DILATION_PX, LOCALISATION_SIGMA_PX


def _ci(m: dict[str, Any]) -> str:
    lo, hi = m["auroc_ci95"]
    return f"{m['auroc']:.3f} ({lo:.3f}–{hi:.3f})"


def _verdict(met: bool | None) -> str:
    return {True: "**met**", False: "**missed**", None: "not evaluated"}[met]


def _header(report: dict[str, Any]) -> list[str]:
    """Title, the model and the run, and every target with its verdict."""
    description = report.get("description") or f"{report['family']}, {report['size']} px"
    lines = [
        f"# Detector evaluation — {report['split']} split of {report['data']}",
        "",
        f"Model `{report['model']}` ({description}, "
        f"{'position-conditioned' if report['conditioned'] else 'unconditioned'}), aggregation "
        f"`{report['aggregation']}`, threshold {report['threshold']:.4g}; {report['series']} series "
        f"({report['normal_series']} normal) scored by every method in {report['seconds']} s "
        f"({report['provider']}). CIs: {report['bootstrap']} bootstrap resamples.",
        "",
        "## Targets",
        "",
    ]
    for t in report["targets"]:
        if t["value"] is None:
            lines.append(f"- {t['target']}: {_verdict(None)}")
            continue
        ci = f" (95 % CI {t['ci95'][0]:.3f}–{t['ci95'][1]:.3f})" if t["ci95"] else ""
        worst = f" (weakest type: {t['worst_type']})" if t.get("worst_type") else ""
        lines.append(f"- {t['target']}: {t['value']:.3f}{ci}{worst} — {_verdict(t['met'])}")
    return lines


def _comparison(report: dict[str, Any]) -> list[str]:
    """Series AUROC of every method, the differences to the detector and the matched pair."""
    methods = report["methods"]
    names = list(methods)
    kinds = list(methods["detector"]["per_type"])
    lines: list[str] = []
    lines += [
        "",
        "## Series AUROC by method (95 % bootstrap CI)",
        "",
        "| anomaly | n | " + " | ".join(methods[k]["label"] for k in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for kind in kinds:
        n = methods["detector"]["per_type"][kind]["n"]
        lines.append(f"| {kind} | {n} | " + " | ".join(_ci(methods[k]["per_type"][kind]) for k in names) + " |")
    others = [k for k in names if k != "detector"]
    lines += [
        "",
        "## AUROC difference: detector − method (paired bootstrap 95 % CI; * = CI excludes 0)",
        "",
        "| anomaly | " + " | ".join(f"− {methods[k]['label']}" for k in others) + " |",
        "|---|" + "---|" * len(others),
    ]
    for kind in kinds:
        cells = []
        for k in others:
            d = report["differences"][k][kind]
            star = "*" if d["excludes_zero"] else ""
            cells.append(f"{d['difference']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}){star}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    if "twin_minus_ablation" in report["differences"]:
        lines += [
            "",
            "## The position condition on a matched pair: twin − ablation (paired bootstrap 95 % CI)",
            "",
            f"Both trained by the same command except `--unconditioned`: "
            f"`{(methods['twin'].get('training') or {}).get('command')}`.",
            "",
            "| anomaly | conditioned − unconditioned |",
            "|---|---|",
        ]
        for kind in kinds:
            d = report["differences"]["twin_minus_ablation"][kind]
            star = "*" if d["excludes_zero"] else ""
            lines.append(f"| {kind} | {d['difference']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}){star} |")
    return lines


def _operating_points(report: dict[str, Any]) -> list[str]:
    """Each method at its own threshold."""
    methods = report["methods"]
    names = list(methods)
    lines: list[str] = []
    lines += [
        "",
        "## Operating point (each method at its own threshold, set on validation normals)",
        "",
        "| method | aggregation | threshold | false-flag rate (unseen normals) | sensitivity (all anomalies) "
        "| slice AUROC |",
        "|---|---|---|---|---|---|",
    ]
    for k in names:
        m = methods[k]
        thr = "—" if m["threshold"] is None else f"{m['threshold']:.4g}"
        ffr = "—" if m["false_flag_rate_normals"] is None else f"{m['false_flag_rate_normals']:.2f}"
        sens = m["per_type"]["all"]["sensitivity_at_threshold"]
        lines.append(
            f"| {m['label']} | {m['aggregation']} | {thr} | {ffr} | "
            f"{'—' if sens is None else f'{sens:.2f}'} | {m['slice_auroc']:.3f} |"
        )
    return lines


def _localisation(report: dict[str, Any]) -> list[str]:
    """Localisation of every method with evidence maps (nothing when none has maps)."""
    methods = report["methods"]
    located = [k for k in methods if methods[k].get("localisation")]
    lines: list[str] = []
    if located:
        lines += [
            "",
            "## Localisation",
            "",
            "Fraction of anomalous series where the argmax of the evidence map (Gaussian-smoothed, "
            f"σ = {LOCALISATION_SIGMA_PX:g} px, inside the body) on the highest-scoring affected slice lies "
            f"in the injected mask dilated by {LOCALISATION_DILATION_PX} px, on each method's map grid "
            "(slice recipe and autoencoder: their input size; patch recipe: its 128² z-map in the image "
            "geometry); chance = fraction of the body inside that dilated mask; [slices] = the same test on "
            "every affected slice (fraction of anomalous slices localised). The HU histogram has no map.",
            "",
            "| anomaly | n | " + " | ".join(f"{methods[k]['label']} (chance) [slices]" for k in located) + " |",
            "|---|---|" + "---|" * len(located),
        ]
        for kind in methods[located[0]]["localisation"]:
            cells = []
            for k in located:
                loc = methods[k]["localisation"].get(kind)
                if loc is None:
                    cells.append("—")
                    continue
                per_slice = "—" if loc.get("slice_hit_rate") is None else f"{loc['slice_hit_rate']:.2f}"
                cells.append(f"{loc['hit_rate']:.2f} ({loc['chance']:.2f}) [{per_slice}]")
            n = methods[located[0]]["localisation"][kind]["n"]
            lines.append(f"| {kind} | {n} | " + " | ".join(cells) + " |")
    return lines


def _cost_and_detail(report: dict[str, Any]) -> list[str]:
    """Training budget and scoring time, the detector's detail, the HU histogram's fit, positions."""
    methods = report["methods"]
    names = list(methods)
    lines: list[str] = []
    lines += [
        "",
        "## Cost (training budget and scoring time of this run)",
        "",
        "| method | model | training wall time (s) | steps | scoring time (s) |",
        "|---|---|---|---|---|",
    ]
    for k in names:
        m = methods[k]
        training = m.get("training") or {}
        wall = training.get("wall_seconds", training.get("train_seconds"))
        steps = training.get("steps", "—")
        steps_text = ", ".join(f"{a} {b}" for a, b in steps.items()) if isinstance(steps, dict) else str(steps)
        lines.append(
            f"| {m['label']} | `{m.get('model')}` | {'—' if wall is None else wall} | {steps_text} | "
            f"{m.get('scoring_seconds', '—')} |"
        )
    main = methods["detector"]
    lines += [
        "",
        "## Detector detail",
        "",
        "| anomaly | n | series AUROC (95 % CI) | AUPRC | sensitivity at threshold |",
        "|---|---|---|---|---|",
    ]
    for kind, m in main["per_type"].items():
        lines.append(f"| {kind} | {m['n']} | {_ci(m)} | {m['auprc']:.3f} | {m['sensitivity_at_threshold']:.2f} |")
    lines += [
        "",
        f"Slice-level AUROC: {main['slice_auroc']:.3f}. False-flag rate of unseen normal series at the "
        f"threshold: {main['false_flag_rate_normals']:.2f}.",
        "",
    ]
    fit = report["hu_histogram_fit"]
    lines += [
        f"HU histogram: {len(fit['hu_bin_edges']) + 1} HU bins × {fit['position_bins']} position bins (the "
        f"detector's positions), fitted on {fit['train_series']} normal series ({fit['train_slices']} slices) "
        f"of {fit['data']} in {fit['seconds']} s.",
        "",
    ]
    quality = report.get("position_quality_validation") or {}
    if quality:
        lines += [
            "Slice position vs the phantom's true body-axis position (validation series, after a linear fit):",
            "",
            "| position | Pearson r | RMSE |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {v['pearson_r']:.3f} | {v['rmse_after_linear_fit']:.3f} |" for k, v in quality.items()]
        lines.append("")
    return lines


def _plots(plots: list[str]) -> list[str]:
    """The figures, each with its caption."""
    lines: list[str] = []
    if plots:
        lines += ["## Plots", ""]
        captions = {
            "roc.png": "Series-level ROC curves per anomaly type, every method",
            "profiles.png": "Detector slice scores along the body axis (head → feet) for example series; "
            "red: affected slices, dashed: series threshold",
            "heatmaps.png": "Evidence maps (residual or z-map) of each method's highest-scoring affected slice "
            "(cyan: injected mask, ×: argmax of the smoothed map)",
        }
        for p in plots:
            lines += [f"{captions.get(p, p)}:", "", f"![{p}]({p})", ""]
    return lines


def report_markdown(report: dict[str, Any], plots: list[str]) -> str:
    """report.md: targets, comparison of methods, differences, operating points, localisation, plots."""
    sections = [_header, _comparison, _operating_points, _localisation, _cost_and_detail]
    return "\n".join([line for section in sections for line in section(report)] + _plots(plots))
