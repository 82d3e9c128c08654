"""The one interface every detector family implements (STYLE.md habit 17, like anomalib's `models/<name>/`).

A family is a folder `models/detector/<name>/` (its networks, training, export and scoring) whose
`api` module holds one `Family`. `models.detector.family.FAMILIES` lists them; an exported model's
`model.json` says which one it is (`models.detector.family.family_name`), and the command line's
`train detector --recipe` names the one to train. Shared code calls these entry points and never
branches on a family itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.detector.diagnosis_inputs import Case, Scored
from models.detector.evaluation.methods import Method


@dataclass(frozen=True)
class BenchRecipe:
    """How the scoring benchmark times a family's scorer (`gatekeeper bench score`, `python -m models.detector
    bench`).

    Attributes:
        item: what one scored item is ("slice", "patch"); rates are items/s.
        default_batches, quick_batches: `bench score`'s batch sizes, without and with --quick.
        score: (model folder, model.json, keyword options of `models.detector.bench.bench_score`) → the
            benchmark's numbers (see `models.detector.bench`).
        torch_and_onnx: (model folder, model.json, torch device) → (torch scorer on it, input feeds,
            served ONNX file name, default batch sizes) for the GPU helper.
    """

    item: str
    default_batches: tuple[int, ...]
    quick_batches: tuple[int, ...]
    score: Callable[..., dict[str, Any]]
    torch_and_onnx: Callable[[Path, dict[str, Any], Any], tuple[Any, Any, str, list[int]]]


@dataclass(frozen=True)
class Family:
    """A detector family's entry points.

    Attributes:
        name: the family's key in `FAMILIES` and its folder under `models/detector/`.
        recipe: the `train detector --recipe` value that trains it and the `recipe` its evaluation
            report states (None: trained by a command of its own, e.g. `train autoencoder`).
        train: run the training command on parsed arguments; return the exit code (0). Raises
            `service.errors.UsageError` on bad arguments or data.
        export: write a model folder's ONNX files again from its `weights.pt`; return their paths
            (None: the family has no re-export).
        load_method: (model folder, its model.json, report label) → the evaluation's scoring method.
        describe: model.json → a short description for reports ("slice recipe, stylegan2 128²").
        variant: model.json → the recipe version a report adds to the detector's label, or None.
        bench: how the scoring benchmark times it (None: not benchmarked).
        diagnose: model folder → (score one diagnosis case, the series aggregation) for `evaluate
            detector --diagnose`, the detector opened once (None: no encoder and generator to diagnose).
    """

    name: str
    recipe: str | None
    train: Callable[[argparse.Namespace], int]
    export: Callable[[Path], list[Path]] | None
    load_method: Callable[[Path, dict[str, Any], str], Method]
    describe: Callable[[dict[str, Any]], str]
    variant: Callable[[dict[str, Any]], str | None]
    bench: BenchRecipe | None
    diagnose: Callable[[Path], tuple[Callable[[Case], Scored], str]] | None
