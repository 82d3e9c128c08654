"""The evaluation's statistics over scored series: per-method AUROC/AUPRC with bootstrap CIs, paired
differences, localisation rates and the targets of the detector (issue 12).

A row is one series: {"type", "affected", "scores": {method: series score}, "slice_scores": {method:
[k]}, "localisation": {method: `localise` result or None}}.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.detector.metrics import auprc, auroc, bootstrap_ci, paired_bootstrap_difference

#: The anomaly types the product promises to catch, and the targets of issue 12 (detector v2).
TARGET_TYPES = ("stent", "tumor", "fluid")
TARGET_AUROC = 0.95
TARGET_FALSE_FLAG_RATE = 0.05
TARGET_SLICE_LOCALISATION = 0.85


def method_summary(rows: list[dict[str, Any]], name: str, threshold: float | None, n_boot: int) -> dict[str, Any]:
    """Method `name` over `rows`: series AUROC (bootstrap CI), AUPRC and sensitivity at `threshold` per
    anomaly type and overall, the false-flag rate of the normals, slice AUROC and localisation rates."""
    normal = np.array([r["scores"][name] for r in rows if r["type"] == "normal"])
    types = sorted({r["type"] for r in rows} - {"normal"})
    out: dict[str, Any] = {"threshold": threshold, "per_type": {}}
    for kind in types + ["all"]:
        pos = np.array([r["scores"][name] for r in rows if r["type"] != "normal" and kind in ("all", r["type"])])
        out["per_type"][kind] = {
            "n": int(pos.size),
            "auroc": round(auroc(normal, pos), 4),
            "auroc_ci95": bootstrap_ci(auroc, normal, pos, n_boot),
            "auprc": round(auprc(normal, pos), 4),
            "sensitivity_at_threshold": None if threshold is None else round(float(np.mean(pos > threshold)), 4),
        }
    out["false_flag_rate_normals"] = (
        None if threshold is None or normal.size == 0 else round(float(np.mean(normal > threshold)), 4)
    )
    slice_neg = [r["slice_scores"][name] for r in rows if r["type"] == "normal"]
    slice_pos = [np.asarray(r["slice_scores"][name])[r["affected"]] for r in rows if r["affected"]]
    out["slice_auroc"] = round(
        auroc(
            np.concatenate(slice_neg) if slice_neg else np.zeros(0),
            np.concatenate(slice_pos) if slice_pos else np.zeros(0),
        ),
        4,
    )
    located = [r for r in rows if r["localisation"].get(name) is not None]
    if located:
        out["localisation"] = {}
        for kind in types + ["all"]:
            sel = [r["localisation"][name] for r in located if kind in ("all", r["type"])]
            if sel:
                affected = sum(s["slices_affected"] for s in sel)
                out["localisation"][kind] = {
                    "n": len(sel),
                    "hit_rate": round(float(np.mean([s["hit"] for s in sel])), 4),
                    "chance": round(float(np.mean([s["chance"] for s in sel])), 4),
                    "slices": affected,
                    "slice_hit_rate": round(sum(s["slices_hit"] for s in sel) / affected, 4) if affected else None,
                }
    else:
        out["localisation"] = None
    return out


def difference(rows: list[dict[str, Any]], first: str, second: str, n_boot: int) -> dict[str, Any]:
    """first − second: paired bootstrap of the series AUROC, per anomaly type and overall."""
    types = sorted({r["type"] for r in rows} - {"normal"})
    out: dict[str, Any] = {}
    neg = [r for r in rows if r["type"] == "normal"]
    for kind in types + ["all"]:
        pos = [r for r in rows if r["type"] != "normal" and kind in ("all", r["type"])]
        diff, ci = paired_bootstrap_difference(
            [r["scores"][first] for r in neg],
            [r["scores"][first] for r in pos],
            [r["scores"][second] for r in neg],
            [r["scores"][second] for r in pos],
            n_boot,
        )
        out[kind] = {"difference": round(diff, 4), "ci95": ci, "excludes_zero": bool(ci[0] > 0 or ci[1] < 0)}
    return out


def differences(rows: list[dict[str, Any]], names: list[str], n_boot: int) -> dict[str, Any]:
    """detector − every other method, and twin − ablation when both were scored."""
    out = {name: difference(rows, "detector", name, n_boot) for name in names if name != "detector"}
    if "twin" in names and "ablation" in names:
        out["twin_minus_ablation"] = difference(rows, "twin", "ablation", n_boot)
    return out


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the detector with its value, CI and whether it is met (None: not evaluated)."""
    main = report["methods"]["detector"]
    out = []
    kinds = list(TARGET_TYPES) + sorted(set(main["per_type"]) - set(TARGET_TYPES) - {"all"})
    for kind in kinds:
        m = main["per_type"].get(kind)
        out.append(
            {
                "target": f"series AUROC >= {TARGET_AUROC} on {kind}",
                "value": None if m is None else m["auroc"],
                "ci95": None if m is None else m["auroc_ci95"],
                "met": None if m is None else bool(m["auroc"] >= TARGET_AUROC),
            }
        )
    ffr = main["false_flag_rate_normals"]
    out.append(
        {
            "target": f"false-flag rate <= {TARGET_FALSE_FLAG_RATE:.0%} of unseen normal series",
            "value": ffr,
            "ci95": None,
            "met": None if ffr is None else bool(ffr <= TARGET_FALSE_FLAG_RATE),
        }
    )
    loc = (main.get("localisation") or {}).get("all")
    rate = None if loc is None else loc["slice_hit_rate"]
    out.append(
        {
            "target": f"localisation >= {TARGET_SLICE_LOCALISATION:.0%} of anomalous slices (evidence peak "
            "inside the dilated mask)",
            "value": rate,
            "ci95": None,
            "met": None if rate is None else bool(rate >= TARGET_SLICE_LOCALISATION),
        }
    )
    twin = "twin_minus_ablation" in report["differences"]
    d = report["differences"].get("twin_minus_ablation" if twin else "ablation", {}).get("all")
    pair = "the matched conditioned twin" if twin else "conditioned"
    out.append(
        {
            "target": f"{pair} better than the unconditioned ablation (paired 95 % CI of the AUROC "
            "difference, all anomalies, above 0)",
            "value": None if d is None else d["difference"],
            "ci95": None if d is None else d["ci95"],
            "met": None if d is None else bool(d["ci95"][0] > 0),
        }
    )
    baselines = [k for k in report["methods"] if k not in ("detector", "twin", "ablation")]
    for name in baselines:
        diffs = {k: v for k, v in report["differences"][name].items() if k != "all"}
        worst = min(diffs, key=lambda k: diffs[k]["ci95"][0]) if diffs else None
        out.append(
            {
                "target": f"better than {report['methods'][name]['label']} on every anomaly type (paired 95 % "
                "CI of the AUROC difference above 0)",
                "value": None if worst is None else diffs[worst]["difference"],
                "ci95": None if worst is None else diffs[worst]["ci95"],
                "worst_type": worst,
                "met": None if worst is None else bool(diffs[worst]["ci95"][0] > 0),
            }
        )
    return out
