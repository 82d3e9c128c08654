"""Evaluate the shipped models on the real CT cases: Dice of the liver against the reference, and the route.

For each case under `--cases` (default `../shared/realct`: `CASE/ct/*.dcm` and `CASE/liver.seg.dcm`):

1. `gatekeeper segment CASE/ct --out SEG` — the command a user runs, with the configured segmenter
   (`--model`, default the shipped one) — and the Dice of its liver against `liver.seg.dcm`, frames of
   the two SEGs matched by the position of their slice along the slice normal (so any SEG of the same
   CT series compares, whatever frames it leaves out);
2. the route the pipeline would give the series: the detector's score, the ingest geometry check, the
   gate (`--gate`, default the shipped one) and `service.pipeline.decide_route`, with every fired
   finding in words.

Writes `--out/report.json` (default `docs/evaluation/real-ct`):
`{"cases": {NAME: {"dice": x, "route": "auto"|"worklist"|"withheld", "reasons": [...], ...}},
"command": ..., "segmenter_version": ..., ...}`. The cases are evaluation data: nothing here trains
or tunes anything on them.

    .venv/bin/python ops/evaluate_real_ct.py [--cases DIR] [--out DIR] [--model DIR] [--gate DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

REPO_DIR = Path(__file__).resolve().parents[1]
DEFAULT_CASES = REPO_DIR.parent / "shared" / "realct"
DEFAULT_OUT = REPO_DIR / "docs" / "evaluation" / "real-ct"
# Positions along the slice normal closer than this (mm) are the same slice.
POSITION_DECIMALS = 2

log = logging.getLogger("evaluate_real_ct")


def slice_positions(headers: Sequence[pydicom.Dataset]) -> list[float]:
    """Position of each CT slice along its slice normal (mm), rounded to `POSITION_DECIMALS`."""
    iop = np.asarray(headers[0].ImageOrientationPatient, np.float64)
    normal = np.cross(iop[:3], iop[3:])
    return [
        round(float(np.dot(normal, np.asarray(h.ImagePositionPatient, np.float64))), POSITION_DECIMALS) for h in headers
    ]


def seg_volume(path: Path, positions: Sequence[float], shape: tuple[int, int], normal: np.ndarray) -> np.ndarray:
    """The union of a SEG's segments as a bool [slice, row, column] volume on the CT's slices.

    Frames are placed by their Plane Position (Patient) along `normal`; frames on no CT slice are ignored.
    """
    seg = pydicom.dcmread(path)
    pixels = seg.pixel_array
    pixels = pixels[None] if pixels.ndim == 2 else pixels
    index = {p: i for i, p in enumerate(positions)}
    volume = np.zeros((len(positions), *shape), bool)
    for frame, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        position = np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, np.float64)
        slot = index.get(round(float(np.dot(normal, position)), POSITION_DECIMALS))
        if slot is not None:
            volume[slot] |= pixels[frame] > 0
    return volume


def dice(predicted: np.ndarray, reference: np.ndarray) -> float:
    total = int(predicted.sum()) + int(reference.sum())
    return 2.0 * int((predicted & reference).sum()) / total if total else 1.0


def route_of(ct_dir: Path, *, segmenter_dir: Path, gate_dir: Path, detector_dir: Path) -> dict[str, Any]:
    """The route the pipeline gives the series in `ct_dir`, with its reason and every fired finding in words."""
    from service import dicom_series
    from service.db.tables import RouteReason
    from service.gate import DetectorEvidence, Gate
    from service.inference import load_detector
    from service.ingest.geometry import check_geometry, planes_from_files
    from service.pipeline import RouteFacts, decide_route
    from service.segmentation import Segmenter
    from service.settings import Settings

    [group] = dicom_series.ct_series_in(dicom_series.scan_tree_strict(ct_dir))
    series = dicom_series.load_series(group)
    geometry = [f.as_dict() for f in check_geometry(planes_from_files([i.path for i in group.instances]))]
    detector = load_detector(detector_dir)
    verdict = detector.score_series(series)
    evidence = DetectorEvidence(
        score=verdict.score,
        threshold=verdict.threshold,
        slice_scores=tuple(s.score for s in verdict.slices),
        model_version=detector.version,
    )
    gate = Gate.load(gate_dir) if (gate_dir / "gate.json").is_file() else Gate.rules_only()
    settings = Settings()
    assessment = gate.assess(
        series=series,
        segmenter=Segmenter(segmenter_dir),
        detector=evidence,
        geometry_findings=geometry,
        min_liver_ml=settings.min_liver_ml,
    )
    result, decision = assessment.segmentation, assessment.decision
    facts = RouteFacts(
        geometry_findings=geometry,
        flagged=verdict.flagged,
        gate=decision,
        liver_found=bool(result.mask.any()) and result.liver_volume_ml >= settings.min_liver_ml,
        off_target_routing=settings.off_target_routing,
    )
    route, reason = decide_route(facts)
    words = [f"{f.signal}: {f.words}" for f in decision.findings if f.fired]
    words += [f"geometry: {g['message']}" for g in geometry]
    return {
        "route": route.value if route is not None else "withheld",
        "route_reason": reason.value if isinstance(reason, RouteReason) else None,
        "reasons": words,
        "gate_version": gate.version,
        "detector_version": detector.version,
        "detector_score": round(float(verdict.score), 4),
        "detector_threshold": round(float(verdict.threshold), 4),
    }


def evaluate_case(case: Path, *, segmenter_dir: Path, gate_dir: Path, detector_dir: Path, work: Path) -> dict[str, Any]:
    from service.commands.main import main as gatekeeper

    ct_dir = case / "ct"
    out = work / f"{case.name}.seg.dcm"
    started = time.perf_counter()
    code = gatekeeper(["segment", str(ct_dir), "--out", str(out), "--model", str(segmenter_dir)])
    segment_s = time.perf_counter() - started
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(ct_dir.glob("*.dcm"))]
    positions = slice_positions(headers)
    iop = np.asarray(headers[0].ImageOrientationPatient, np.float64)
    normal = np.cross(iop[:3], iop[3:])
    shape = (int(headers[0].Rows), int(headers[0].Columns))
    reference = seg_volume(case / "liver.seg.dcm", positions, shape, normal)
    entry: dict[str, Any] = {"slices": len(headers), "matrix": list(shape), "segment_exit_code": code}
    if code == 0:
        predicted = seg_volume(out, positions, shape, normal)
        entry.update(
            dice=round(dice(predicted, reference), 3),
            predicted_voxels=int(predicted.sum()),
            reference_voxels=int(reference.sum()),
        )
    else:
        entry.update(dice=0.0 if code == 1 else None, predicted_voxels=0, reference_voxels=int(reference.sum()))
    entry["segment_wall_s"] = round(segment_s, 1)
    entry.update(route_of(ct_dir, segmenter_dir=segmenter_dir, gate_dir=gate_dir, detector_dir=detector_dir))
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    from service.commands.score import DEFAULT_MODEL_DIR as DEFAULT_DETECTOR_DIR
    from service.segmentation import DEFAULT_MODEL_DIR as DEFAULT_SEGMENTER_DIR
    from service.segmentation import Segmenter
    from service.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=Path, default=DEFAULT_CASES, help=f"real CT cases (default {DEFAULT_CASES})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of report.json (default %(default)s)")
    parser.add_argument("--model", type=Path, default=DEFAULT_SEGMENTER_DIR, help="segmenter (default: shipped)")
    parser.add_argument("--gate", type=Path, default=None, help="gate folder (default: the configured gate)")
    parser.add_argument("--detector", type=Path, default=DEFAULT_DETECTOR_DIR, help="detector (default: shipped)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cases = sorted(p for p in args.cases.glob("*") if (p / "ct").is_dir() and (p / "liver.seg.dcm").is_file())
    if not cases:
        print(f"evaluate_real_ct: no cases (CASE/ct and CASE/liver.seg.dcm) under {args.cases}", file=sys.stderr)
        return 2
    gate_dir = args.gate or Settings().gate_model_dir
    segmenter = Segmenter(args.model)
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            results[case.name] = evaluate_case(
                case, segmenter_dir=args.model, gate_dir=gate_dir, detector_dir=args.detector, work=Path(tmp)
            )
            r = results[case.name]
            print(f"{case.name}: Dice {r['dice']}, route {r['route']} ({r['route_reason']}); {'; '.join(r['reasons'])}")
    command = [".venv/bin/python", "ops/evaluate_real_ct.py", *(sys.argv[1:] if argv is None else argv)]
    report = {
        "cases": results,
        "command": shlex.join(command),
        "segmenter_name": segmenter.name,
        "segmenter_version": segmenter.version,
        "gate_version": next(iter(results.values()))["gate_version"],
        "detector_version": next(iter(results.values()))["detector_version"],
        "reference": "TotalSegmentator's liver label on each series (a model's output, good to about ±0.03 Dice)",
        "matching": f"frames matched by position along the slice normal, rounded to {POSITION_DECIMALS} decimals (mm)",
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
