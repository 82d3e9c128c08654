"""Options of `gatekeeper train detector|autoencoder` and `gatekeeper bench score` (no torch here, so the CLI
can list them cheaply)."""

from __future__ import annotations

import argparse
from pathlib import Path

from service.imaging import AGGREGATIONS

#: Network families of `--family` (model.json `family`); the detector families are `models.detector.family.FAMILIES`.
NETWORK_FAMILIES = ("dcgan", "stylegan2", "aae")
#: How the patch recipe turns a patch's reconstruction into its raw score (models/detector/patch/networks.py).
PATCH_SCORES = ("local", "mean")
SIZES = (64, 128, 256)
RECIPES = ("slice", "patch")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="folder tree of normal DICOM CT series")
    p.add_argument("--out", required=True, type=Path, help="model folder (checkpoint, ONNX files, model.json)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--recipe",
        default="slice",
        choices=RECIPES,
        help="slice = whole slices at --size, abdomen window (default; the shipped model); patch = v2: "
        "32-px patches at 1.5 mm of the body-centred slice, abdomen + liver + metal windows "
        "(models/detector/patch/train.py)",
    )
    p.add_argument("--size", type=int, default=64, choices=SIZES, help="slice size in pixels (default 64)")
    p.add_argument(
        "--family",
        default="dcgan",
        choices=NETWORK_FAMILIES,
        help="network family (default dcgan): dcgan and stylegan2 are trained as a GAN, then the encoder "
        "izi_f-style against the frozen generator (f-AnoGAN); aae (--recipe patch only) trains the DCGAN networks as "
        "an adversarial autoencoder first (encoder and generator together: L1 reconstruction of coarse-noised "
        "patches + adversarial + discriminator-feature matching), then the same izi_f encoder phase",
    )
    p.add_argument(
        "--position",
        default="bpr",
        choices=("bpr", "naive"),
        help="slice position: bpr = body-part regression (default), naive = 0..1 within the series",
    )
    p.add_argument("--unconditioned", action="store_true", help="ablation: ignore the slice position")
    p.add_argument("--minutes", type=float, default=60.0, help="time budget for all training phases (default 60)")
    p.add_argument("--gan-steps", type=int, default=None, help="stop the GAN phase after this many steps")
    p.add_argument("--encoder-steps", type=int, default=None, help="stop the encoder phase after this many steps")
    p.add_argument("--position-steps", type=int, default=None, help="stop the position phase after this many steps")
    p.add_argument("--batch", type=int, default=32, help="batch size (multiple of 4; default 32)")
    p.add_argument("--kappa", type=float, default=1.0, help="weight of the feature residual (default 1)")
    p.add_argument(
        "--false-flag-rate",
        type=float,
        default=0.05,
        help="fraction of validation normal series allowed above the threshold (default 0.05)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--jobs", type=int, default=None, help="processes for reading DICOM (default: all cores)")
    p.add_argument("--max-series", type=int, default=None, help="use at most this many training series")
    p.add_argument("--checkpoint-every", type=float, default=120.0, help="seconds between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    g = p.add_argument_group("patch recipe (--recipe patch; --size is then the body-part regression's input)")
    g.add_argument("--spacing-mm", type=float, default=1.5, help="pixel spacing of the resampled slice (default 1.5)")
    g.add_argument(
        "--field-mm",
        type=float,
        default=480.0,
        help="side of the body-centred field (default 480: holds a 460-mm scan field, the widest phantom FOV)",
    )
    g.add_argument("--patch", type=int, default=32, choices=(32,), help="patch side in pixels (32)")
    g.add_argument("--stride", type=int, default=16, help="patch grid stride in pixels (default 16)")
    g.add_argument(
        "--patch-score",
        default="local",
        choices=PATCH_SCORES,
        help="raw patch score before the per-bin z-score: local = the largest Gaussian-smoothed (sigma 1.5 px) "
        "|x - G(E(x))| of the patch's inner 24 px over the CT windows (default; a small finding is not averaged "
        "away), mean = the mean squared residual over the patch (v2); + kappa * the feature residual either way",
    )
    g.add_argument(
        "--local-sigma",
        type=float,
        default=1.5,
        help="--patch-score local: sigma in pixels of the Gaussian that smooths |x - G(E(x))| before its peak "
        "is taken (default 1.5 = 2.25 mm; larger averages tissue texture away, keeps a lesion-sized peak). "
        "Scoring only: with --resume on a finished model it recalibrates and re-exports without training",
    )
    g.add_argument(
        "--aae-noise-hu",
        type=float,
        default=0.0,
        help="--family aae: std in HU of the coarse noise added before windowing (one smooth field for all "
        "windows, like a lesion); 0 (default, v3) adds std 0.2 per window channel in [-1, 1] units instead",
    )
    g.add_argument(
        "--aae-noise-grid",
        type=int,
        default=4,
        help="--family aae: side of the coarse noise's grid per 32-px patch (default 4: blobs of ~8 px)",
    )
    g.add_argument(
        "--range-margin",
        type=float,
        default=0.05,
        help="slices within the training positions' range ± this margin count for the series score (default 0.05)",
    )


def add_pool_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `gatekeeper train detector --pool` (models/active_learning/detector.py)."""
    g = p.add_argument_group(
        "retraining from the training pool (--pool): trains on --data (the normal base data) plus the pool's "
        "CT series counted as in-distribution (the segmenter now handles them); validation and threshold stay "
        "on the base data's normals; the result is registered as a candidate"
    )
    g.add_argument("--pool", action="store_true", help="count the training pool's series as normal training series")
    g.add_argument(
        "--pool-dir",
        type=Path,
        default=None,
        help="with --pool: a pool exported by `gatekeeper pool export DIR`, or any folder of CT series "
        "(default: export the configured database's pool into --out/pool)",
    )
    g.add_argument("--by", default=None, help="with --pool: who registers the candidate (default: your login name)")


def add_autoencoder_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `gatekeeper train autoencoder` (the convolutional-autoencoder baseline)."""
    p.add_argument("--data", required=True, type=Path, help="folder tree of normal DICOM CT series")
    p.add_argument("--out", required=True, type=Path, help="model folder (autoencoder.onnx, model.json, weights.pt)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--size",
        type=int,
        default=128,
        choices=SIZES,
        help="slice size in pixels: use the detector's size (default 128, the shipped detector's)",
    )
    p.add_argument("--minutes", type=float, default=20.0, help="training time budget (default 20)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps instead of the time budget")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--latent", type=int, default=128, help="bottleneck size of --noise none (default 128)")
    p.add_argument(
        "--noise",
        default="none",
        choices=("none", "coarse"),
        help="none = conv autoencoder (default); coarse = the coarse-noise denoising autoencoder of "
        "Kascenas et al. 2022 (a U-Net trained to remove low-resolution upsampled Gaussian noise)",
    )
    p.add_argument("--noise-res", type=int, default=16, help="--noise coarse: noise grid side in pixels (default 16)")
    p.add_argument(
        "--noise-std",
        type=float,
        default=0.2,
        help="--noise coarse: noise std in the [-1, 1] image scale (default 0.2)",
    )
    p.add_argument(
        "--aggregation",
        default="top3_mean",
        choices=AGGREGATIONS,
        help="series aggregation of slice scores (default top3_mean)",
    )
    p.add_argument(
        "--false-flag-rate",
        type=float,
        default=0.05,
        help="fraction of validation normal series allowed above the threshold (default 0.05)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--jobs", type=int, default=None, help="processes for reading DICOM (default: all cores)")
    p.add_argument("--max-series", type=int, default=None, help="use at most this many training series")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine)",
    )


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `gatekeeper bench score`."""
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model folder (model.json + ONNX files; default the shipped models/detector/default)",
    )
    p.add_argument(
        "--batches",
        default=None,
        help="comma-separated batch sizes (default 1,16,64 slices; a patch model (format 2): 64,512 patches)",
    )
    p.add_argument("--seconds", type=float, default=4.0, help="seconds of timing per engine and batch (default 4)")
    p.add_argument("--series-slices", type=int, default=300, help="slices of the end-to-end series (default 300)")
    p.add_argument("--matrix", type=int, default=512, help="rows and columns of that series (default 512)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for torch and ONNX Runtime alike in the engine comparison (default: the "
        "machine's cores; the end-to-end series always uses ONNX Runtime's default, like score)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few seconds in all (batch 2, a 16-slice 64² series): for tests, not for numbers",
    )
