"""Benchmark: how long the phantom takes for one 200-slice 512×512 series on ONE core.

Target (issue 2): ≤ 20 s for the whole series — slices, CT files and ground-truth SEGs.
Machines here are noisy, so the same run also times a reference on the same core: writing the
same 200 CT files with pydicom from pixels that are already in memory (the I/O floor any
generator pays). It prints both, and the ratio generator / reference.

    .venv/bin/python ops/bench_phantom.py [--slices 200] [--matrix 512] [--repeat 1]
"""

from __future__ import annotations

import os

# One core, one thread: set before numpy/scipy load their thread pools.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the best is reported")
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {args.core})

    from service.phantom.dicom import SeriesIdentity, ct_datasets, write_ct_slice
    from service.phantom.generate import SeriesSpec, generate_series

    spec = SeriesSpec(folder="bench", patient_seed=1234, series_seed=5678, num_slices=args.slices, matrix=args.matrix)
    generator_s, reference_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            out = Path(tmp) / f"gen{r}"
            t0 = time.perf_counter()
            entry = generate_series(spec, out)
            generator_s.append(time.perf_counter() - t0)

            # Reference: the same headers and file count, pixels ready in memory.
            from service.phantom.anatomy import Patient
            from service.phantom.scanner import plan_geometry

            geometry = plan_geometry(
                Patient(1234),
                np.random.default_rng([5678, 0x5E]),
                num_slices=args.slices,
                matrix=args.matrix,
                anomaly=None,
            )
            datasets = ct_datasets(
                SeriesIdentity(patient_seed=1234, series_seed=5678), geometry, series_description="REFERENCE"
            )
            pixels = np.random.default_rng(0).integers(0, 2000, (args.matrix, args.matrix), dtype=np.uint16)
            ref = Path(tmp) / f"ref{r}"
            ref.mkdir()
            t0 = time.perf_counter()
            for i, ds in enumerate(datasets):
                write_ct_slice(ds, pixels, ref / f"CT{i + 1:06d}.dcm")
            reference_s.append(time.perf_counter() - t0)
    gen, ref_t = min(generator_s), min(reference_s)
    k = entry["geometry"]["num_slices"]
    print(f"phantom benchmark on 1 core (core {args.core}), {k} slices of {args.matrix}x{args.matrix}")
    print(f"  generator (slices + CT files + organ SEG): {gen:7.2f} s  ({gen / k * 1000:6.1f} ms/slice)")
    print(f"  reference (write the same CT files only): {ref_t:7.2f} s  ({ref_t / k * 1000:6.1f} ms/slice)")
    print(f"  ratio generator / reference:              {gen / ref_t:7.1f}x")
    target = 20.0 * k / 200 * (args.matrix / 512) ** 2
    print(f"  target <= {target:.1f} s: {'met' if gen <= target else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
