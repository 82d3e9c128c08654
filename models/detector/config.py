"""Options of `gatekeeper train detector` (no torch here, so the CLI can list them cheaply)."""

from __future__ import annotations

import argparse
from pathlib import Path

FAMILIES = ("dcgan", "stylegan2")
SIZES = (64, 128, 256)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="folder tree of normal DICOM CT series")
    p.add_argument("--out", required=True, type=Path, help="model folder (checkpoint, ONNX files, model.json)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--size", type=int, default=64, choices=SIZES, help="slice size in pixels (default 64)")
    p.add_argument("--family", default="dcgan", choices=FAMILIES, help="network family (default dcgan)")
    p.add_argument("--position", default="bpr", choices=("bpr", "naive"),
                   help="slice position: bpr = body-part regression (default), naive = 0..1 within the series")
    p.add_argument("--unconditioned", action="store_true", help="ablation: ignore the slice position")
    p.add_argument("--minutes", type=float, default=60.0, help="time budget for all training phases (default 60)")
    p.add_argument("--gan-steps", type=int, default=None, help="stop the GAN phase after this many steps")
    p.add_argument("--encoder-steps", type=int, default=None, help="stop the encoder phase after this many steps")
    p.add_argument("--position-steps", type=int, default=None, help="stop the position phase after this many steps")
    p.add_argument("--batch", type=int, default=32, help="batch size (multiple of 4; default 32)")
    p.add_argument("--kappa", type=float, default=1.0, help="weight of the feature residual (default 1)")
    p.add_argument("--false-flag-rate", type=float, default=0.05,
                   help="fraction of validation normal series allowed above the threshold (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--jobs", type=int, default=None, help="processes for reading DICOM (default: all cores)")
    p.add_argument("--max-series", type=int, default=None, help="use at most this many training series")
    p.add_argument("--checkpoint-every", type=float, default=120.0, help="seconds between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
