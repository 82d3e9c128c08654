"""`gatekeeper evaluate segmenter`: Dice and volume error of segmenters on a phantom test split and on real CT.

    gatekeeper evaluate segmenter --model NAME=DIR [--model NAME=DIR …] --data DIR [--split test]
        [--real DIR] --out DIR [--bootstrap 1000]

In one run, every `--model` segments every contoured CT series of `--data`'s split (a phantom run: its
manifest names each series' anomaly type; normals and each anomaly type are reported apart) and every
case of `--real` (a folder of `CASE/ct/` series each with a reference `CASE/liver.seg.dcm`). Dice is the
3-D Dice at the series' own matrix after serving's post-processing (`Segmenter.segment`); volume error is
(predicted − reference) / reference. The first model is the candidate: paired bootstrap CIs of its Dice
minus every other model's on the phantom normals. Writes report.json, report.md and real_ct.png (real
slices: the reference next to each model's prediction). Real cases are evaluation data only.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.commission.leakage import leaked_series
from models.detector.data import scan_parallel
from models.segmenter.contours import find_liver_contours
from service import dicom_series
from service.errors import UsageError
from service.segmentation import Segmenter, dice

log = logging.getLogger(__name__)

#: A phantom series' group in the report: its anomaly type, or "normal".
NORMAL = "normal"


def register(what: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `evaluate segmenter`."""
    p = what.add_parser(
        "segmenter",
        help="Dice and volume error of segmenters on a phantom test split and on real CT cases",
        description="Segment a phantom run's split (normals and each anomaly type) and real CT cases with each "
        "--model, and report Dice against the contours and volume error; the first model is compared with the "
        "others by paired bootstrap on the phantom normals.",
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="NAME=DIR of a segmenter model folder; repeat to compare (the first is the candidate)",
    )
    p.add_argument("--data", type=Path, required=True, help="a phantom run (manifest.json) or contoured CT series")
    p.add_argument("--split", default="test", help="manifest split to evaluate (default test; 'all' for every)")
    p.add_argument("--real", type=Path, default=None, help="folder of real cases: CASE/ct/ and CASE/liver.seg.dcm")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.set_defaults(func=run)


def _models(specs: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise UsageError(f"--model {spec!r}: expected NAME=DIR")
        if not (Path(folder) / "model.json").is_file():
            raise UsageError(f"--model {spec!r}: no model.json in {folder}")
        out[name] = Path(folder)
    return out


def _manifest_groups(root: Path) -> dict[str, tuple[str, str]]:
    """SeriesInstanceUID → (split, group) from every manifest.json under `root`."""
    groups: dict[str, tuple[str, str]] = {}
    for path in sorted(root.rglob("manifest.json")):
        for entry in json.loads(path.read_text()).get("series", []):
            anomaly = entry.get("anomaly")
            group = anomaly["type"] if anomaly else (NORMAL if entry.get("category") == "normal" else "off_target")
            groups[entry["series_instance_uid"]] = (str(entry.get("split")), group)
    return groups


def _evaluate_series(
    segmenters: dict[str, Segmenter], files: dicom_series.SeriesFiles, contour: Any
) -> dict[str, Any] | None:
    """Dice and volume error of each segmenter on one contoured series, or None when it cannot be read."""
    try:
        series = dicom_series.load_series(files)
        reference = contour.volume_for(series)
    except ValueError as exc:
        log.warning("skipping a series: %s", exc)
        return None
    voxel_ml = series.pixel_spacing_mm[0] * series.pixel_spacing_mm[1] * max(series.slice_spacing_mm, 1e-3) / 1000
    ref_ml = float(reference.sum() * voxel_ml)
    row: dict[str, Any] = {"series_instance_uid": series.series_instance_uid, "reference_ml": round(ref_ml, 1)}
    for name, seg in segmenters.items():
        t0 = time.monotonic()
        result = seg.segment(series)
        row[name] = {
            "dice": round(dice(result.mask, reference), 4),
            "volume_error": round((result.liver_volume_ml - ref_ml) / ref_ml, 4) if ref_ml > 0 else None,
            "seconds": round(time.monotonic() - t0, 2),
        }
        row.setdefault("_masks", {})[name] = result.mask
    row["_series"] = series
    row["_reference"] = reference
    return row


def _summary(rows: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"series": len(rows)}
    for name in names:
        d = np.array([r[name]["dice"] for r in rows])
        v = np.array([abs(r[name]["volume_error"]) for r in rows if r[name]["volume_error"] is not None])
        out[name] = {
            "dice_mean": round(float(d.mean()), 4) if d.size else None,
            "dice_min": round(float(d.min()), 4) if d.size else None,
            "abs_volume_error_mean": round(float(v.mean()), 4) if v.size else None,
        }
    return out


def _paired_ci(a: np.ndarray, b: np.ndarray, n: int, seed: int = 0) -> list[float]:
    """95 % bootstrap CI of mean(a − b) over paired series."""
    rng = np.random.default_rng(seed)
    diff = a - b
    means = [float(diff[rng.integers(0, len(diff), len(diff))].mean()) for _ in range(n)]
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


def _real_figure(cases: dict[str, dict[str, Any]], names: list[str], path: Path) -> None:
    """Per real case three slices through the reference liver: the image with the reference, then each model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(case, k) for case, c in cases.items() for k in c["_slices"]]
    cols = 1 + len(names)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.0 * cols, 3.0 * len(rows)), squeeze=False)
    for r, (case, k) in enumerate(rows):
        c = cases[case]
        image = c["_series"].hu[k]
        for j in range(cols):
            ax = axes[r, j]
            ax.imshow(image, cmap="gray", vmin=-160, vmax=240)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.contour(c["_reference"][k], [0.5], colors="lime", linewidths=1.0)
                ax.set_title(f"{case} slice {k + 1}\nreference", fontsize=8)
            else:
                name = names[j - 1]
                ax.contour(c["_reference"][k], [0.5], colors="lime", linewidths=0.6, alpha=0.6)
                ax.contour(c["_masks"][name][k], [0.5], colors="red", linewidths=1.0)
                ax.set_title(f"{name}: Dice {c[name]['dice']:.3f}", fontsize=8)
    fig.suptitle("Real CT: reference liver (green) and each segmenter (red)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    models = _models(args.model)
    names = list(models)
    segmenters = {name: Segmenter(folder) for name, folder in models.items()}
    if not args.data.is_dir():
        raise UsageError(f"--data {args.data}: no such folder")
    args.out.mkdir(parents=True, exist_ok=True)

    groups_by_uid = _manifest_groups(args.data)
    scanned = scan_parallel(args.data, 1)
    contours = find_liver_contours(scanned)
    reported = [g.series_instance_uid for g in dicom_series.ct_series_in(scanned) if g.series_instance_uid in contours]
    leak = leaked_series(reported, {f"--model {name}": folder for name, folder in models.items()})
    if leak is not None:
        raise UsageError(leak)
    phantom: dict[str, list[dict[str, Any]]] = {}
    for files in dicom_series.ct_series_in(scanned):
        split, group = groups_by_uid.get(files.series_instance_uid, ("all", "unknown"))
        if args.split != "all" and split != args.split:
            continue
        if files.series_instance_uid not in contours:
            continue  # off-target: no liver to compare with
        row = _evaluate_series(segmenters, files, contours[files.series_instance_uid])
        if row is None:
            continue
        for key in ("_masks", "_series", "_reference"):
            row.pop(key)
        row["group"] = group
        phantom.setdefault(group, []).append(row)
        log.info("%s %s: %s", group, files.series_instance_uid[-8:], {n: row[n]["dice"] for n in names})

    real: dict[str, dict[str, Any]] = {}
    if args.real is not None:
        for case in sorted(p for p in args.real.iterdir() if (p / "liver.seg.dcm").is_file()):
            scanned_case = scan_parallel(case, 1)
            case_contours = find_liver_contours(scanned_case)
            cts = dicom_series.ct_series_in(scanned_case)
            if len(cts) != 1 or cts[0].series_instance_uid not in case_contours:
                raise UsageError(f"{case}: expected one CT series and its liver.seg.dcm")
            row = _evaluate_series(segmenters, cts[0], case_contours[cts[0].series_instance_uid])
            if row is None:
                raise UsageError(f"{case}: the CT series cannot be read")
            with_liver = np.flatnonzero(row["_reference"].any(axis=(1, 2)))
            row["_slices"] = [int(with_liver[int(f * (len(with_liver) - 1))]) for f in (0.2, 0.5, 0.8)]
            real[case.name] = row
            log.info("real %s: %s", case.name, {n: row[n]["dice"] for n in names})

    all_rows = [r for rows in phantom.values() for r in rows]
    report: dict[str, Any] = {
        "meta": {
            "command": "gatekeeper " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "models": {n: {"dir": str(p), "version": segmenters[n].version} for n, p in models.items()},
            "data": str(args.data),
            "split": args.split,
            "real": str(args.real) if args.real else None,
            "seconds": round(time.monotonic() - t_start, 1),
            "machine": f"{platform.machine()}, python {platform.python_version()}",
        },
        "phantom": {group: _summary(rows, names) for group, rows in sorted(phantom.items())},
        "phantom_all": _summary(all_rows, names),
        "real": {
            case: {n: row[n] for n in names} | {"reference_ml": row["reference_ml"]} for case, row in real.items()
        },
        "series": [{k: v for k, v in r.items()} for r in all_rows],
    }
    normals = phantom.get(NORMAL, [])
    if normals and len(names) > 1:
        cand = np.array([r[names[0]]["dice"] for r in normals])
        report["normals_paired"] = {
            other: {
                "dice_difference_mean": round(float((cand - np.array([r[other]["dice"] for r in normals])).mean()), 4),
                "ci95": _paired_ci(cand, np.array([r[other]["dice"] for r in normals]), args.bootstrap),
            }
            for other in names[1:]
        }
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    if real:
        _real_figure(real, names, args.out / "real_ct.png")
    (args.out / "report.md").write_text(_markdown(report, names))
    print(_markdown(report, names))
    return 0


def _markdown(report: dict[str, Any], names: list[str]) -> str:
    lines = [
        "# Segmenter evaluation",
        "",
        f"Command: `{report['meta']['command']}` ({report['meta']['seconds']:.0f} s, {report['meta']['machine']}).",
        "",
        "Dice (mean / min) and mean |volume error| per group:",
        "",
        "| group | series | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for group, s in list(report["phantom"].items()) + [("all phantom", report["phantom_all"])]:
        if not s["series"]:
            continue
        cells = [
            f"{s[n]['dice_mean']:.3f} / {s[n]['dice_min']:.3f} ({100 * (s[n]['abs_volume_error_mean'] or 0):.1f} %)"
            for n in names
        ]
        lines.append(f"| {group} | {s['series']} | " + " | ".join(cells) + " |")
    for case, r in report["real"].items():
        cells = [f"{r[n]['dice']:.3f} ({100 * (r[n]['volume_error'] or 0):+.1f} %)" for n in names]
        lines.append(f"| real: {case} | 1 | " + " | ".join(cells) + " |")
    for other, p in report.get("normals_paired", {}).items():
        lines += [
            "",
            f"{names[0]} − {other} on phantom normals: {p['dice_difference_mean']:+.4f} (95 % CI {p['ci95'][0]:+.4f} … "
            f"{p['ci95'][1]:+.4f}).",
        ]
    return "\n".join(lines) + "\n"
