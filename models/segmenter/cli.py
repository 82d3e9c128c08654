"""Registration of `gatekeeper train segmenter`, `gatekeeper evaluate gate` and `gatekeeper evaluate candidate`
(torch only when training runs).

`register_commands` is the entry point of the group `gatekeeper.commands` (pyproject.toml) that the
`gatekeeper` command (`service.commands.main`) calls with its command groups.
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
    if args.pool:
        from models.active_learning.segmenter import run_cli as run_pool

        return run_pool(args)
    from models.segmenter.train import run_cli

    return run_cli(args)


def register_evaluate(what: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `evaluate gate` and `evaluate candidate` (a registered segmenter or detector against the active one)."""
    from models.active_learning.config import add_candidate_arguments
    from models.active_learning.curve import register as register_active_learning
    from models.segmenter.evaluate import register as register_segmenter
    from models.segmenter.evaluate_gate import register

    register(what)
    register_segmenter(what)
    register_active_learning(what)
    c = what.add_parser(
        "candidate",
        help="compare a candidate model version with the active one on a fixed held-out phantom set",
        description="Run the registry's active version and a candidate of KIND (segmenter or detector) on a "
        "fixed held-out set (normals and each anomaly type; a phantom set generated once, or --data) and say "
        "whether promoting the candidate is safe: no regression on normals beyond --tolerance, better on the "
        "kinds of series in its training pool.",
    )
    add_candidate_arguments(c)
    c.set_defaults(func=_run_candidate)


def _run_candidate(args: argparse.Namespace) -> int:
    from models.active_learning.candidate import run_cli

    return run_cli(args)
