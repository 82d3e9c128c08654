"""Registration of `gatekeeper train detector|autoencoder`, `gatekeeper evaluate detector` and
`gatekeeper bench score` (no torch import until a command runs)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add `train detector|autoencoder`; return the `train` subcommands so other models can add theirs."""
    p = subparsers.add_parser(
        "train",
        help="train a model (needs the 'train' extra: torch)",
        description="Train, calibrate and export a model.",
    )
    what = p.add_subparsers(dest="what", metavar="MODEL", required=True)
    d = what.add_parser(
        "detector",
        help="the slice-position-conditioned GAN anomaly detector",
        description="Train the detector on normal DICOM CT series, calibrate it on held-out "
        "normals and export ONNX files + model.json to --out.",
    )
    from models.detector.config import add_arguments, add_autoencoder_arguments

    add_arguments(d)
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
    return what


def _run(args: argparse.Namespace) -> int:
    from models.detector.train import run_cli

    return run_cli(args)


def _run_autoencoder(args: argparse.Namespace) -> int:
    from models.detector.autoencoder import run_cli

    return run_cli(args)


def register_evaluate(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add `evaluate detector`; return the `evaluate` subcommands so other models can add theirs."""
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a model on a labelled phantom split",
        description="Evaluate an exported model (ONNX Runtime) on a phantom test split.",
    )
    what = p.add_subparsers(dest="what", metavar="MODEL", required=True)
    from models.detector.evaluate import register

    register(what)
    return what


def register_bench(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmarks (needs the 'train' extra: torch)", description="Measure speed on this machine."
    )
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True)
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
