"""Options of `gatekeeper train segmenter` (no torch here, so the CLI can list them cheaply)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", required=True, type=Path, help="folder tree of CT series with liver contours (SEG/RTSTRUCT)"
    )
    p.add_argument("--out", required=True, type=Path, help="model folder (checkpoint, segmenter.onnx, model.json)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--recipe",
        choices=("phantom", "synth"),
        default="phantom",
        help="phantom: train on --data's contoured series; synth: domain randomisation on rendered phantom tissue "
        "maps (--data gives the validation series only) (default phantom)",
    )
    p.add_argument(
        "--pixel-spacing",
        type=float,
        default=None,
        help="the network's pixel size in mm in a body-centred field (default: 3.2 with --recipe synth; the "
        "legacy whole-matrix resize with --recipe phantom)",
    )
    p.add_argument("--bank-patients", type=int, default=120, help="synth: phantom patients to render (default 120)")
    p.add_argument(
        "--bank-per-patient", type=int, default=40, help="synth: 3-slice tissue stacks per patient (default 40)"
    )
    p.add_argument("--size", type=int, default=128, help="network input size in pixels, multiple of 16 (default 128)")
    p.add_argument("--base", type=int, default=16, help="channels of the first U-Net level (default 16)")
    p.add_argument("--context", type=int, default=1, help="neighbouring slices on each side as input (default 1)")
    p.add_argument("--steps", type=int, default=2400, help="training steps (default 2400)")
    p.add_argument("--minutes", type=float, default=60.0, help="hard time cap for training (default 60)")
    p.add_argument("--batch", type=int, default=8, help="slices per step (default 8)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--val-every", type=int, default=400, help="steps between validation passes (default 400)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--jobs", type=int, default=None, help="processes for reading DICOM (default: all cores)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--max-series", type=int, default=None, help="use at most this many training series")
    p.add_argument("--checkpoint-every", type=float, default=120.0, help="seconds between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    g = p.add_argument_group(
        "retraining from the training pool (--pool): fine-tunes the model registry's active segmenter on "
        "--data (its base data; --max-series limits it) plus the pool, and registers the result as a candidate; "
        "--size, --base and --context then come from the active model"
    )
    g.add_argument("--pool", action="store_true", help="fine-tune the active segmenter on --data plus the pool")
    g.add_argument(
        "--pool-dir",
        type=Path,
        default=None,
        help="with --pool: a pool exported by `gatekeeper pool export DIR`, or any folder of CT series with liver "
        "contours (default: export the configured database's pool into --out/pool)",
    )
    g.add_argument("--fine-tune-steps", type=int, default=300, help="with --pool: training steps (default 300)")
    g.add_argument("--fine-tune-lr", type=float, default=5e-4, help="with --pool: peak learning rate (default 5e-4)")
    g.add_argument("--by", default=None, help="with --pool: who registers the candidate (default: your login name)")
