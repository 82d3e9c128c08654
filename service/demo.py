"""`gatekeeper demo`: the product's main job, end to end, on synthetic data.

Today it writes a small phantom study — one normal series and two anomalous ones — and prints
what it wrote. As the listener, detector and segmenter land, the demo grows into the full path
(push to the listener, score, SEG to a PACS or the worklist) without changing its command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEMO_SERIES = (("normal", None), ("tumor", "tumor"), ("stent", "stent"))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the demo on a synthetic study (what `make demo` runs)")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="where the demo writes (default out/demo)")
    p.add_argument("--slices", type=int, default=60, help="slices per series (default 60)")
    p.add_argument("--seed", type=int, default=2026, help="seed of the synthetic patients (default 2026)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.cli import UsageError
    from service.phantom.cli import prepare_output, print_manifest
    from service.phantom.generate import SeriesSpec, generate_run

    if args.slices < 8:
        raise UsageError(f"--slices must be >= 8 for a useful demo, got {args.slices}")
    prepare_output(args.out, force=True)  # the demo replaces its own previous study
    specs = [
        SeriesSpec(folder=f"{i + 1:02d}_{label}", patient_seed=args.seed + i, series_seed=args.seed * 10 + i,
                   anomaly=anomaly, num_slices=args.slices)
        for i, (label, anomaly) in enumerate(DEMO_SERIES)
    ]
    manifest = generate_run(specs, args.out, meta={"protocol": "demo", "seed": args.seed})
    print_manifest(manifest, args.out)
    print("Open any folder in a DICOM viewer, or push it to a PACS with DCMTK: "
          f"storescu -aec ORTHANC localhost 4242 +sd {args.out}/01_normal")
    return 0
