"""Registration of `gatekeeper train detector|autoencoder`, `gatekeeper evaluate detector` and
`gatekeeper bench score` (no torch import until a command runs).

`register_commands` is the entry point of the group `gatekeeper.commands` (pyproject.toml) that the
`gatekeeper` command (`service.commands.main`) calls with its command groups.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping


def register_commands(groups: Mapping[str, argparse._SubParsersAction[argparse.ArgumentParser]]) -> None:
    """Add the detector's subcommands to the `train`, `evaluate` and `bench` groups of `gatekeeper`."""
    register_train(groups["train"])
    register_evaluate(groups["evaluate"])
    register_bench(groups["bench"])


def register_train(what: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `train detector` and `train autoencoder`."""
    d = what.add_parser(
        "detector",
        help="the slice-position-conditioned GAN anomaly detector",
        description="Train the detector on normal DICOM CT series, calibrate it on held-out "
        "normals and export ONNX files + model.json to --out.",
    )
    from models.detector.config import add_arguments, add_autoencoder_arguments, add_pool_arguments

    add_arguments(d)
    add_pool_arguments(d)
    d.set_defaults(func=_run)
    a = what.add_parser(
        "autoencoder",
        help="the convolutional-autoencoder baseline of the detector evaluation",
        description="Train a convolutional autoencoder on the same normal slices as the detector "
        "(same size and preprocessing), calibrate it on held-out normals and export "
        "autoencoder.onnx + model.json to --out.",
    )
    add_autoencoder_arguments(a)
    a.set_defaults(func=_run_autoencoder)


def _run(args: argparse.Namespace) -> int:
    if args.pool:
        from models.active_learning.detector import run_cli as run_pool

        return run_pool(args)
    from models.detector.family import train_detector

    return train_detector(args)


def _run_autoencoder(args: argparse.Namespace) -> int:
    from models.detector.family import FAMILIES

    return FAMILIES["autoencoder"].train(args)


def register_evaluate(what: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `evaluate detector`."""
    from models.detector.evaluate import register

    register(what)


def register_bench(what: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `bench score`."""
    s = what.add_parser(
        "score",
        help="detector scoring speed: ONNX Runtime vs PyTorch eager, 300-slice series",
        description="Slices/s of the fused ONNX Runtime scorer vs PyTorch eager (fp32 and bf16) on "
        "the same slices and batch sizes (CPU), GFLOP per slice vs this machine's measured "
        "matmul peak, and the end-to-end time to score a 300-slice series.",
    )
    from models.detector.config import add_bench_arguments

    add_bench_arguments(s)
    s.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from models.detector.bench import run_cli

    return run_cli(args)
