"""Benchmark: how long building and writing the liver DICOM-SEG of a 300-slice 512×512 series takes.

Target (issue 5): "300 slices of 512×512 encode in a few seconds". Machines here are noisy, so the
same run also times a reference on the same core: pydicom writing the 300 CT files of the source
series themselves, from pixels already in memory (what one series costs to write at all). It prints
both, and the ratio SEG / reference.

The source series is headers only (the phantom's CT headers for a 300-slice scan plan; the SEG does
not need the pixels); the mask is an ellipsoidal "liver" over 60 % of the slices, so empty frames
are omitted as in real use.

    .venv/bin/python ops/bench_seg.py [--slices 300] [--matrix 512] [--repeat 3]
"""

from __future__ import annotations

import os

# One core, one thread: set before numpy loads its thread pools.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def ellipsoid_mask(slices: int, matrix: int) -> np.ndarray:
    """A bool [slice, row, column] ellipsoid over the middle 60 % of the slices, a third of the width."""
    z, y, x = np.ogrid[:slices, :matrix, :matrix]
    centre_z, half_z = slices / 2, 0.3 * slices
    return ((z - centre_z) / half_z) ** 2 + ((y - 0.45 * matrix) / (0.2 * matrix)) ** 2 + (
        (x - 0.35 * matrix) / (0.17 * matrix)
    ) ** 2 <= 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best is reported")
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {args.core})

    from service.dicom_seg import build_liver_seg
    from service.phantom.anatomy import Patient
    from service.phantom.dicom import SeriesIdentity, ct_datasets, write_ct_slice
    from service.phantom.scanner import plan_geometry

    geometry = plan_geometry(
        Patient(1234), np.random.default_rng([5678, 0x5E]), num_slices=args.slices, matrix=args.matrix, anomaly=None
    )
    headers = ct_datasets(SeriesIdentity(patient_seed=1234, series_seed=5678), geometry, series_description="BENCH")
    mask = ellipsoid_mask(args.slices, args.matrix)
    pixels = np.random.default_rng(0).integers(0, 2000, (args.matrix, args.matrix), dtype=np.uint16)

    build_s, write_s, seg_s, reference_s = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            path = Path(tmp) / f"seg{r}.dcm"
            t0 = time.perf_counter()
            seg = build_liver_seg(
                source_images=headers,
                mask=mask,
                algorithm_name="bench",
                algorithm_version="bench",
                source_series_version=1,
            )
            t1 = time.perf_counter()
            seg.save_as(path)
            t2 = time.perf_counter()
            build_s.append(t1 - t0)
            write_s.append(t2 - t1)
            seg_s.append(t2 - t0)
            size_mb = path.stat().st_size / 1e6
            del seg

            ref = Path(tmp) / f"ref{r}"
            ref.mkdir()
            t0 = time.perf_counter()
            for i, ds in enumerate(headers):
                write_ct_slice(ds, pixels, ref / f"CT{i + 1:06d}.dcm")
            reference_s.append(time.perf_counter() - t0)
    seg_t, ref_t = min(seg_s), min(reference_s)
    frames = int(mask.any(axis=(1, 2)).sum())
    print(
        f"DICOM-SEG benchmark on 1 core (core {args.core}): {args.slices} source slices of "
        f"{args.matrix}x{args.matrix}, {frames} frames with liver, SEG file {size_mb:.1f} MB"
    )
    print(f"  build (highdicom Segmentation): {min(build_s):7.2f} s")
    print(f"  write (save_as):                {min(write_s):7.2f} s")
    print(f"  build + write:                  {seg_t:7.2f} s")
    print(f"  reference (write the {args.slices} CT files): {ref_t:7.2f} s")
    print(f"  ratio SEG / reference:          {seg_t / ref_t:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
