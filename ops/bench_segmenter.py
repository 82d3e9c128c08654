"""Benchmark: the liver segmenter's cost per series, a candidate against a reference model, in one run.

Target: the body-centred, fixed-pixel-size segmenter costs at most 1.2× the whole-matrix one per series
(framing, resampling, the network, mapping back and post-processing: `Segmenter.segment`). Machines here
are noisy, so both models segment the same series alternately, `--repeat` times each, and the ratio of
their median times is printed.

    .venv/bin/python ops/bench_segmenter.py --model NEW --reference OLD [--slices 120] [--matrix 512] [--repeat 3]

The series is a phantom (generated on the fly, normal abdomen).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

from service import dicom_series
from service.phantom.generate import SeriesSpec, generate_run
from service.segmentation import Segmenter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="candidate segmenter folder")
    p.add_argument("--reference", type=Path, required=True, help="reference segmenter folder")
    p.add_argument("--slices", type=int, default=120)
    p.add_argument("--matrix", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        spec = SeriesSpec(
            folder="s", patient_seed=7, series_seed=8, anomaly=None, num_slices=args.slices, matrix=args.matrix
        )
        generate_run([spec], Path(tmp), progress=False)
        [files] = dicom_series.ct_series_in(dicom_series.scan_tree(Path(tmp) / "s"))
        series = dicom_series.load_series(files)
    models = {"candidate": Segmenter(args.model), "reference": Segmenter(args.reference)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    for seg in models.values():
        seg.session = ort.InferenceSession(
            str(seg.model_dir / seg.meta["file"]), options, providers=["CPUExecutionProvider"]
        )
        seg.segment(series)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeat):
        for name, seg in models.items():
            t0 = time.perf_counter()
            seg.segment(series)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, seg in models.items():
        print(f"{name}: {seg.version} median {med[name]:.2f} s over {args.repeat} ({args.slices} × {args.matrix}²)")
    ratio = med["candidate"] / med["reference"]
    print(f"ratio candidate / reference: {ratio:.2f} (target ≤ 1.20: {'met' if ratio <= 1.2 else 'missed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
