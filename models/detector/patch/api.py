"""The patch recipe's entry points (`Family`): 32² multi-window patches at a fixed spacing, a GAN
(v2, `--family dcgan`) or an adversarial autoencoder (v3/v4, `--family aae`) on them, patch
z-scores calibrated on held-out validation normals (model.json format 2). Not shipped; the best
candidate so far (docs/results.md). Training code is imported when a command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.detector.diagnosis_inputs import Case, Scored
from models.detector.interface import BenchRecipe, Family
from models.detector.patch import scoring


def train(args: argparse.Namespace) -> int:
    """`gatekeeper train detector --recipe patch`."""
    from models.detector.patch.train import run_cli

    return run_cli(args)


def bench_score(model_dir: Path, meta: dict[str, Any], **options: Any) -> dict[str, Any]:
    """`gatekeeper bench score` of this family (`models.detector.patch.bench.bench_score`)."""
    from models.detector.patch.bench import bench_score as score

    return score(model_dir, meta, **options)


def torch_and_onnx(model_dir: Path, meta: dict[str, Any], device: Any) -> tuple[Any, Any, str, list[int]]:
    """The GPU bench helper's engines (`models.detector.patch.bench.torch_and_onnx`)."""
    from models.detector.patch.bench import torch_and_onnx as engines

    return engines(model_dir, meta, device)


def diagnose(model_dir: Path) -> tuple[Callable[[Case], Scored], str]:
    """`evaluate detector --diagnose` of this family (`models.detector.patch.diagnosis.case_scorer`)."""
    from models.detector.patch.diagnosis import case_scorer

    return case_scorer(model_dir)


BENCH = BenchRecipe(
    item="patch",
    default_batches=(64, 512),
    quick_batches=(16,),
    score=bench_score,
    torch_and_onnx=torch_and_onnx,
)

FAMILY = Family(
    name="patch",
    recipe="patch",
    train=train,
    export=None,
    load_method=scoring.load_method,
    describe=scoring.describe,
    variant=scoring.patch_version,
    bench=BENCH,
    diagnose=diagnose,
)
