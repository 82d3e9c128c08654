"""`gatekeeper score SERIES_DIR... [--json]`: score DICOM CT series with the detector (ONNX Runtime only).

Each SERIES_DIR may hold one or more CT series (grouped by SeriesInstanceUID, any file names);
non-image objects beside them (DICOM-SEG ground truth …) are ignored. A bad series — one slice,
mixed sizes, not CT, unreadable pixels, NaN — gives an error entry naming the problem, the other
series are still scored, and the exit code is 1. Exit 0: every series was scored (flagged or not).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service import dicom_series
from service.errors import UsageError
from service.model_paths import DEFAULT_DETECTOR_DIR

if TYPE_CHECKING:  # onnxruntime is imported only when `score` runs
    from service.inference import Detector, PatchDetector

log = logging.getLogger(__name__)

#: The shipped detector (`service.model_paths`), under the name the tests and scripts use.
DEFAULT_MODEL_DIR = DEFAULT_DETECTOR_DIR
EXIT_BAD_SERIES = 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "score",
        help="score DICOM CT series with the anomaly detector",
        description="Score every CT series in each SERIES_DIR slice by slice with the exported detector "
        "(ONNX Runtime). Exit 1 if any series could not be scored.",
    )
    p.add_argument("series_dirs", nargs="+", type=Path, metavar="SERIES_DIR", help="folder(s) of DICOM files")
    p.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_DETECTOR_DIR,
        help=f"model folder with model.json and the ONNX files (default {DEFAULT_DETECTOR_DIR})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.set_defaults(func=run)


def score_folders(detector: Detector | PatchDetector, folders: list[Path]) -> list[dict[str, Any]]:
    """One result dict per series found (or per folder that yields none); errors are entries, not raises."""
    results: list[dict[str, Any]] = []
    for folder in folders:
        try:
            groups = dicom_series.scan_tree_strict(folder)
        except (OSError, dicom_series.UnidentifiedFilesError) as exc:
            results.append({"folder": str(folder), "series_instance_uid": None, "error": str(exc)})
            continue
        if not groups:
            results.append({"folder": str(folder), "series_instance_uid": None, "error": f"no DICOM files in {folder}"})
            continue
        ct = dicom_series.ct_series_in(groups)
        for group in ct or groups[:1]:  # no CT at all: report why the first series is unusable
            entry: dict[str, Any] = {"folder": str(folder), "series_instance_uid": group.series_instance_uid}
            try:
                series = dicom_series.load_series(group)
                entry.update(detector.score_series(series).as_dict())
                entry["error"] = None
            except dicom_series.SeriesError as exc:
                entry["error"] = exc.problem
            except Exception as exc:  # noqa: BLE001 — one series must never end the run; logged with traceback
                log.exception("scoring series %s failed", group.series_instance_uid)
                entry["error"] = f"internal error while scoring: {type(exc).__name__}: {exc}"
            results.append(entry)
    return results


def run(args: argparse.Namespace) -> int:
    from service.inference import load_detector

    try:
        detector = load_detector(args.model)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot load the detector from {args.model}: {exc}") from None
    results = score_folders(detector, args.series_dirs)
    if args.json:
        json.dump({"model": str(args.model), "provider": detector.provider, "series": results}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for r in results:
            if r["error"]:
                print(f"ERROR   {r['series_instance_uid'] or '-'}  {r['folder']}: {r['error']}")
            else:
                verdict = "FLAGGED" if r["flagged"] else "ok"
                worst = max(r["slices"], key=lambda s: s["score"])
                print(
                    f"{verdict:7s} {r['series_instance_uid']}  score {r['score']:.3f} (threshold "
                    f"{r['threshold']:.3f}), {len(r['slices'])} slices, worst slice {worst['sop_instance_uid']}"
                )
    return EXIT_BAD_SERIES if any(r["error"] for r in results) else 0
