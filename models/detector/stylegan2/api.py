"""The slice recipe's entry points (`Family`): a position-conditioned GAN on whole slices, f-AnoGAN
encoder, body-part regression; the shipped detector (`models/detector/default`, family stylegan2).

The same folder trains the compact DCGAN networks (`--family dcgan`, model.json family "dcgan"), the
CPU-trainable pair of the position-condition ablation. Training code is imported when a command runs,
so that `gatekeeper --help` does not load torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.detector.diagnosis_inputs import Case, Scored
from models.detector.interface import BenchRecipe, Family
from models.detector.stylegan2 import scoring


def train(args: argparse.Namespace) -> int:
    """`gatekeeper train detector [--recipe slice]`."""
    from models.detector.stylegan2.train import run_cli

    return run_cli(args)


def export(model_dir: Path) -> list[Path]:
    """Every ONNX file of `model_dir` again from its weights.pt (`models.detector.stylegan2.export.reexport`)."""
    from models.detector.stylegan2.export import reexport

    return reexport(model_dir)


def variant(meta: dict[str, Any]) -> str | None:
    """The slice recipe has one version."""
    return None


def bench_score(model_dir: Path, meta: dict[str, Any], **options: Any) -> dict[str, Any]:
    """`gatekeeper bench score` of this family (`models.detector.stylegan2.bench.bench_score`)."""
    from models.detector.stylegan2.bench import bench_score as score

    return score(model_dir, meta, **options)


def torch_and_onnx(model_dir: Path, meta: dict[str, Any], device: Any) -> tuple[Any, Any, str, list[int]]:
    """The GPU bench helper's engines (`models.detector.stylegan2.bench.torch_and_onnx`)."""
    from models.detector.stylegan2.bench import torch_and_onnx as engines

    return engines(model_dir, meta, device)


def diagnose(model_dir: Path) -> tuple[Callable[[Case], Scored], str]:
    """`evaluate detector --diagnose` of this family (`models.detector.stylegan2.diagnosis.case_scorer`)."""
    from models.detector.stylegan2.diagnosis import case_scorer

    return case_scorer(model_dir)


BENCH = BenchRecipe(
    item="slice",
    default_batches=(1, 16, 64),
    quick_batches=(2,),
    score=bench_score,
    torch_and_onnx=torch_and_onnx,
)

FAMILY = Family(
    name="stylegan2",
    recipe="slice",
    train=train,
    export=export,
    load_method=scoring.load_method,
    describe=scoring.describe,
    variant=variant,
    bench=BENCH,
    diagnose=diagnose,
)
