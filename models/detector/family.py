"""The detector families and how a model or a command picks one (STYLE.md habit 17).

`FAMILIES` maps a family's name to its entry points (`models.detector.interface.Family`), one folder
each under `models/detector/`. An exported model is routed by its `model.json` (`family_name`); the
training command by `--recipe` (`family_for_recipe`). Shared code (the `gatekeeper` commands, the
evaluation, the training pool) calls these and never branches on a family itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from models.detector.autoencoder.api import FAMILY as AUTOENCODER
from models.detector.autoencoder.scoring import AUTOENCODER_KIND
from models.detector.evaluation.methods import Method
from models.detector.interface import Family
from models.detector.patch.api import FAMILY as PATCH
from models.detector.stylegan2.api import FAMILY as STYLEGAN2
from service.errors import UsageError

FAMILIES: dict[str, Family] = {f.name: f for f in (STYLEGAN2, PATCH, AUTOENCODER)}
#: model.json `family` values of format-1 (slice recipe) detectors, all trained by the stylegan2 folder:
#: the shipped StyleGAN2-style networks and the compact DCGAN of the CPU ablation pair.
SLICE_NETWORKS = ("stylegan2", "dcgan")
#: model.json `format` of each detector family (the autoencoder has its own `kind` instead).
FORMATS = {1: STYLEGAN2.name, 2: PATCH.name}


def family_name(meta: dict[str, Any]) -> str:
    """The family that exported a model, from its model.json.

    An autoencoder says so by `kind`; a detector by `format` (1: slice recipe, whose `family` names
    its networks, stylegan2 or dcgan; 2: patch recipe).

    Raises:
        ValueError: neither an autoencoder nor a known detector format (message names the field).
    """
    if meta.get("kind") == AUTOENCODER_KIND:
        return AUTOENCODER.name
    model_format = meta.get("format")
    if model_format not in FORMATS:
        raise ValueError(f"model.json: format {model_format!r}; expected one of {sorted(FORMATS)}")
    if model_format == 1 and meta.get("family", "stylegan2") not in SLICE_NETWORKS:
        raise ValueError(f"model.json: family {meta.get('family')!r}; expected one of {SLICE_NETWORKS} for format 1")
    return FORMATS[model_format]


def family_of(meta: dict[str, Any]) -> Family:
    """`FAMILIES[family_name(meta)]`. Raises ValueError like `family_name`."""
    return FAMILIES[family_name(meta)]


def family_for_recipe(recipe: str) -> Family:
    """The family `train detector --recipe RECIPE` trains.

    Raises:
        ValueError: no family has that recipe (message names the option).
    """
    for family in FAMILIES.values():
        if family.recipe is not None and family.recipe == recipe:
            return family
    choices = sorted(f.recipe for f in FAMILIES.values() if f.recipe is not None)
    raise ValueError(f"--recipe must be one of {choices}, got {recipe!r}")


def read_meta(model_dir: Path) -> dict[str, Any]:
    """The model.json of `model_dir`. Raises FileNotFoundError when there is none."""
    meta: dict[str, Any] = json.loads((Path(model_dir) / "model.json").read_text())
    return meta


def describe(meta: dict[str, Any]) -> str:
    """A short description of a model from its model.json, for reports (its family's `describe`)."""
    return family_of(meta).describe(meta)


def load_method(model_dir: Path, label: str | None = None) -> Method:
    """The model in `model_dir` as an evaluation method, by its family; `label` defaults to `describe`.

    Raises:
        FileNotFoundError: no model.json there. ValueError: an invalid model.json (message names it).
    """
    meta = read_meta(model_dir)
    family = family_of(meta)
    return family.load_method(Path(model_dir), meta, label or family.describe(meta))


def train_detector(args: argparse.Namespace) -> int:
    """`gatekeeper train detector`: train the family of `args.recipe` (default slice: the shipped one).

    Raises:
        service.errors.UsageError: bad arguments or data (one line, exit code 2).
    """
    try:
        family = family_for_recipe(args.recipe)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return family.train(args)
