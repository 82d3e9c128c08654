"""Registration of `gatekeeper train segmenter` and `gatekeeper evaluate gate` (torch only when training runs).

`register_commands` is the entry point of the group `gatekeeper.commands` (pyproject.toml) that the
`gatekeeper` command (`service.cli`) calls with its command groups.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping


def register_commands(groups: Mapping[str, argparse._SubParsersAction[argparse.ArgumentParser]]) -> None:
    """Add the segmenter's subcommands to the `train` and `evaluate` groups of `gatekeeper`."""
    register_train(groups["train"])
    register_evaluate(groups["evaluate"])


def register_train(what: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `train segmenter`."""
    s = what.add_parser(
        "segmenter",
        help="the liver segmenter (2.5-D U-Net)",
        description="Train the liver segmenter on CT series with liver contours (DICOM-SEG or "
        "RTSTRUCT) and export segmenter.onnx + model.json to --out.",
    )
    from models.segmenter.config import add_arguments

    add_arguments(s)
    s.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from models.segmenter.train import run_cli

    return run_cli(args)


def register_evaluate(what: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `evaluate gate`."""
    from models.segmenter.evaluate_gate import register

    register(what)
