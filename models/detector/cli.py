"""Registration of `gatekeeper train detector` (no torch import until the command runs)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a model (needs the 'train' extra: torch)",
                              description="Train, calibrate and export a model.")
    what = p.add_subparsers(dest="what", metavar="MODEL", required=True)
    d = what.add_parser("detector", help="the slice-position-conditioned GAN anomaly detector",
                        description="Train the detector on normal DICOM CT series, calibrate it on held-out "
                        "normals and export ONNX files + model.json to --out.")
    from models.detector.config import add_arguments

    add_arguments(d)
    d.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from models.detector.train import run_cli

    return run_cli(args)


def register_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate a model on a labelled phantom split",
                              description="Evaluate an exported model (ONNX Runtime) on a phantom test split.")
    what = p.add_subparsers(dest="what", metavar="MODEL", required=True)
    from models.detector.evaluate import register

    register(what)
