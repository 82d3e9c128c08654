"""`python -m models.detector COMMAND` — detector jobs without the service CLI (for bare GPU machines).

python -m models.detector phantom-train-set --out DIR [--matrix 128] [--jobs N] [--seed 0] [--slices K]
python -m models.detector train --data DIR --out DIR [...]   (same options as `gatekeeper train detector`,
                                                --recipe slice|patch)
python -m models.detector baseline-ae --data DIR --out DIR [--minutes N] [--seed 0]   (autoencoder baseline;
                                                same options as `gatekeeper train autoencoder`)
python -m models.detector bench --model DIR [--device cuda]    (scoring throughput, torch vs ONNX Runtime)
python -m models.detector export --model DIR     (ONNX files again from weights.pt + model.json)
python -m models.detector recalibrate --model DIR --data DIR   (patch recipe: threshold from held-out
                                                validation scores, the training data's validation split)
python -m models.detector samples --model DIR [--data DIR] --out PNG   (samples and reconstructions)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    if argv and argv[0] == "train":
        return _train(argv[1:])
    if argv and argv[0] == "baseline-ae":
        from models.detector.autoencoder.train import main as autoencoder_main

        return autoencoder_main(argv[1:])
    if argv and argv[0] == "export":
        p = argparse.ArgumentParser(prog="python -m models.detector export")
        p.add_argument("--model", required=True, type=Path, help="model folder with model.json and weights.pt")
        return _export(p.parse_args(argv[1:]).model)
    if argv and argv[0] == "recalibrate":
        p = argparse.ArgumentParser(prog="python -m models.detector recalibrate")
        p.add_argument("--model", required=True, type=Path, help="patch-recipe model folder (model.json + ONNX)")
        p.add_argument("--data", required=True, type=Path, help="the model's training data (its validation split)")
        a = p.parse_args(argv[1:])
        from models.detector.patch.calibrate import recalibrate

        recalibrate(a.model, a.data)
        return 0
    if argv and argv[0] == "samples":
        from models.detector.stylegan2.samples import main as samples_main

        return samples_main(argv[1:])
    if argv and argv[0] == "bench":
        from models.detector.bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "phantom-train-set":
        p = argparse.ArgumentParser(prog="python -m models.detector phantom-train-set")
        p.add_argument("--out", required=True, type=Path)
        p.add_argument("--matrix", type=int, default=128)
        p.add_argument("--jobs", type=int, default=1)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--slices", type=int, default=None)
        a = p.parse_args(argv[1:])
        from models.detector.data import generate_phantom_training_set

        t0 = time.monotonic()
        manifest = generate_phantom_training_set(a.out, matrix=a.matrix, jobs=a.jobs, seed=a.seed, num_slices=a.slices)
        n = sum(e["geometry"]["num_slices"] for e in manifest["series"])
        logging.getLogger(__name__).info(
            "phantom train+validation: %d series, %d slices in %.0f s",
            len(manifest["series"]),
            n,
            time.monotonic() - t0,
        )
        return 0
    print(__doc__, file=sys.stderr)
    return 2


def _train(argv: Sequence[str]) -> int:
    """`train`: the family of `--recipe` (default slice), as `gatekeeper train detector` without the pool."""
    from models.detector.config import add_arguments
    from models.detector.family import train_detector
    from service.errors import UsageError

    parser = argparse.ArgumentParser(prog="python -m models.detector train", description="Train the detector.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return train_detector(args)
    except UsageError as exc:
        print(f"train detector: error: {exc}", file=sys.stderr)
        return 2


def _export(model_dir: Path) -> int:
    """`export`: the ONNX files of `model_dir` again from weights.pt, by the family its model.json names."""
    from models.detector.family import family_of, read_meta

    family = family_of(read_meta(model_dir))
    if family.export is None:
        print(f"export: the {family.name} family has no re-export (train it again)", file=sys.stderr)
        return 2
    family.export(model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
