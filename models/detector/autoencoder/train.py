"""`gatekeeper train autoencoder`: the autoencoder baselines of the detector evaluation.

Two baselines, both trained on the same normal slices as the detector, at the detector's size and
with its preprocessing (`service.imaging.preprocess_slices`), neither with a position condition nor
an adversary. If the GAN does not beat them, the GAN is not worth its cost.

* `--noise none` (default): a plain conv autoencoder with a dense bottleneck (`ConvAutoencoder`),
  trained to reconstruct its input; slice error e = mean squared |x − AE(x)|² inside the body mask.
* `--noise coarse`: the coarse-noise denoising autoencoder of Kascenas et al. 2022 ("Denoising
  autoencoders for unsupervised anomaly detection in brain MRI", MIDL), the strongest simple
  unsupervised baseline there: a U-Net (`DenoisingUNet`, no bottleneck) trained to remove *coarse*
  Gaussian noise — drawn at `--noise-res`² (default 16²), upsampled bilinearly to the slice size,
  randomly shifted, `--noise-std` (default 0.2 in the [-1, 1] image scale), added inside the body —
  from normal slices. At scoring time it gets the clean slice: what it changes is what does not look
  normal. Slice error e = the largest value inside the body of |x − DAE(x)| smoothed with a
  Gaussian (σ = `DAE_SMOOTH_SIGMA_PX`), so a local finding is not averaged away.

For both: slice score = (e − μ)/σ with μ and σ measured on the validation normal slices (≈ 0
typical, larger = more unusual); series score = the `--aggregation` of the slice scores; threshold =
the smallest that flags at most `--false-flag-rate` of the validation normal series (normals only, as
for the detector). Training stops after `--minutes` (the same CPU budget as the GAN, for a fair
comparison) or `--steps`.

Writes to `--out`: `autoencoder.onnx` (image [N,1,S,S], mask [N,1,S,S] → score [N], error [N],
residual_map [N,1,S,S] = |x − AE(x)| in the body; opset 17, dynamic batch), `model.json` (kind
`ct-slice-autoencoder`, `noise` says which baseline) and `weights.pt` (state dict + args, for the
parity test). Scored without torch by `models.detector.autoencoder.scoring.AutoencoderBaseline`.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.detector.autoencoder.networks import (
    DAE_SMOOTH_SIGMA_PX,
    NOISE_KINDS,
    AutoencoderScorer,
    build_scorer,
    coarse_noise,
)
from models.detector.autoencoder.scoring import AUTOENCODER_KIND
from models.detector.config import add_autoencoder_arguments
from models.detector.data import Dataset, SeriesData, cpu_count, load_dataset
from models.detector.metrics import threshold_at_false_flag_rate
from models.detector.onnx_graph import OPSET, export_graph
from service import imaging
from service.errors import UsageError

log = logging.getLogger(__name__)


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the option when an argument is impossible."""
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if not args.minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if not 0 <= args.false_flag_rate < 1:
        raise ValueError(f"--false-flag-rate must be within [0, 1), got {args.false_flag_rate}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.out.is_file():
        raise ValueError(f"--out {args.out} is a file, not a folder")
    if args.noise not in NOISE_KINDS:
        raise ValueError(f"--noise must be one of {NOISE_KINDS}, got {args.noise!r}")
    if args.noise == "coarse":
        if not 2 <= args.noise_res <= args.size:
            raise ValueError(f"--noise-res must be within 2..--size ({args.size}), got {args.noise_res}")
        if not args.noise_std > 0:
            raise ValueError(f"--noise-std must be > 0, got {args.noise_std}")


@torch.no_grad()
def series_errors(
    scorer: AutoencoderScorer, series: list[SeriesData], device: torch.device, batch: int = 64
) -> list[np.ndarray]:
    """Raw slice errors of every series (eval mode)."""
    scorer.eval()
    out = []
    for s in series:
        errs = []
        for i in range(0, s.num_slices, batch):
            x = torch.from_numpy(s.images[i : i + batch].astype(np.float32)).to(device)[:, None]
            m = torch.from_numpy(s.masks[i : i + batch].astype(np.float32)).to(device)[:, None]
            errs.append(scorer.errors(x, m)[0].cpu().numpy())
        out.append(np.concatenate(errs))
    return out


def fit(args: argparse.Namespace, data: Dataset, device: torch.device) -> tuple[AutoencoderScorer, list[float], float]:
    """Train the scorer of `args` on `data.train` until `--steps` or `--minutes`; return it, the loss per
    step and the training seconds."""
    images = torch.from_numpy(np.concatenate([s.images for s in data.train])[:, None]).to(device)
    masks = torch.from_numpy(np.concatenate([s.masks for s in data.train])[:, None]).to(device)
    n = images.shape[0]
    denoising = args.noise == "coarse"
    scorer = build_scorer(args).to(device)
    opt = torch.optim.Adam(scorer.ae.parameters(), lr=1e-3)
    rng = torch.Generator(device="cpu").manual_seed(args.seed)
    history: list[float] = []
    step, last_log, budget = 0, time.monotonic(), args.minutes * 60.0
    t_train = time.monotonic()
    scorer.train()
    while (step < args.steps) if args.steps is not None else (time.monotonic() - t_train < budget):
        idx = torch.randint(n, (args.batch,), generator=rng).to(device)
        x = images[idx].float()
        if denoising:  # remove coarse noise added inside the body; the clean slice is the target
            noise = coarse_noise(args.batch, args.size, args.noise_res, args.noise_std, rng).to(device)
            loss = F.mse_loss(scorer.ae(x + noise * masks[idx].float()), x)
        else:
            loss = F.mse_loss(scorer.ae(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
        opt.step()
        step += 1
        history.append(float(loss.detach()))
        if time.monotonic() - last_log >= 15.0:
            last_log = time.monotonic()
            log.info("autoencoder step %d (%.0f s): mse %.5f", step, last_log - t_train, history[-1])
    train_seconds = time.monotonic() - t_train
    log.info("autoencoder (noise %s): %d steps in %.0f s", args.noise, step, train_seconds)

    return scorer, history, train_seconds


def model_json(
    args: argparse.Namespace,
    data: Dataset,
    device: torch.device,
    *,
    history: list[float],
    normalisation: tuple[float, float],
    threshold: float,
    val_scores: list[float],
    train_seconds: float,
    wall_seconds: float,
) -> dict[str, Any]:
    """The model.json of a trained autoencoder: what it is, its normalisation (μ, σ of the validation
    slice errors), threshold and how it was trained."""
    mu, sigma = normalisation
    denoising = args.noise == "coarse"
    n = sum(s.num_slices for s in data.train)
    step = len(history)
    w = max(1, len(history) // 10)
    command = "gatekeeper train autoencoder " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k not in ("func", "command", "what", "verbose") and v not in (None, False)
    )
    noise_meta: dict[str, object] = {"kind": args.noise}
    if denoising:
        noise_meta |= {
            "resolution": args.noise_res,
            "std": args.noise_std,
            "upsampling": "bilinear, rolled by a random offset",
            "where": "inside the body mask",
            "reference": "Kascenas et al. 2022, Denoising autoencoders for unsupervised anomaly detection in brain MRI",
        }
    model = {
        "format": 1,
        "kind": AUTOENCODER_KIND,
        "architecture": "unet" if denoising else "conv-bottleneck",
        "noise": noise_meta,
        "slice_error": (
            f"max inside the body of |x - DAE(x)| smoothed with a Gaussian (sigma {DAE_SMOOTH_SIGMA_PX:g} px)"
            if denoising
            else "mean squared |x - AE(x)| inside the body"
        ),
        "size": args.size,
        "latent": None if denoising else args.latent,
        "preprocessing": {
            "function": "service.imaging.preprocess_slices",
            "window_center_hu": imaging.ABDOMEN_WINDOW.center,
            "window_width_hu": imaging.ABDOMEN_WINDOW.width,
            "scale": "windowed [0,1] * 2 - 1",
            "body_threshold_hu": imaging.BODY_THRESHOLD_HU,
        },
        "files": {"autoencoder": "autoencoder.onnx"},
        "onnx_opset": OPSET,
        "normalisation": {"mu_error": mu, "sigma_error": sigma},
        "aggregation": args.aggregation,
        "threshold": threshold,
        "target_false_flag_rate": args.false_flag_rate,
        "validation_series_scores": [round(float(v), 5) for v in val_scores],
        "training": {
            "command": command,
            "seed": args.seed,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "data": str(args.data),
            "data_hash_sha256": data.data_hash(),
            "train_series": len(data.train),
            "train_slices": n,
            "validation_series": len(data.validation),
            "trained_on_series": sorted(s.series_instance_uid for s in data.train),
            "calibrated_on_series": sorted(s.series_instance_uid for s in data.validation),
            "steps": step,
            "batch": args.batch,
            "train_seconds": round(train_seconds, 1),
            "wall_seconds": round(wall_seconds, 1),
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "metrics": {
            "mse": {
                "first": round(float(np.mean(history[:w])), 6) if history else None,
                "last": round(float(np.mean(history[-w:])), 6) if history else None,
                "steps": step,
            }
        },
    }
    return model


def train_autoencoder(args: argparse.Namespace) -> Path:
    """Train, calibrate on validation normals, export; return the model folder.

    Raises:
        ValueError: impossible arguments or unusable data (message names the option or series).
    """
    check_args(args)
    t0 = time.monotonic()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_dataset(args.data, args.size, jobs=args.jobs or cpu_count(), seed=args.seed, max_series=args.max_series)
    scorer, history, train_seconds = fit(args, data, device)

    errors = series_errors(scorer, data.validation, device)
    flat = np.concatenate(errors)
    mu, sigma = float(flat.mean()), float(max(flat.std(), 1e-12))
    scorer.norm.copy_(torch.tensor([mu, sigma]))
    val_scores = [imaging.aggregate_slice_scores((e - mu) / sigma, args.aggregation) for e in errors]
    threshold = threshold_at_false_flag_rate(np.array(val_scores), args.false_flag_rate)

    args.out.mkdir(parents=True, exist_ok=True)
    scorer = scorer.cpu().eval()
    x = torch.rand(2, 1, args.size, args.size) * 2 - 1
    m = (torch.rand(2, 1, args.size, args.size) > 0.3).float()
    export_graph(scorer, (x, m), args.out / "autoencoder.onnx", ["image", "mask"], ["score", "error", "residual_map"])
    args_dict = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
    torch.save({"scorer": scorer.state_dict(), "args": args_dict}, args.out / "weights.pt")
    model = model_json(
        args,
        data,
        device,
        history=history,
        normalisation=(mu, sigma),
        threshold=threshold,
        val_scores=val_scores,
        train_seconds=train_seconds,
        wall_seconds=time.monotonic() - t0,
    )
    (args.out / "model.json").write_text(json.dumps(model, indent=1))
    log.info("autoencoder written to %s (threshold %.4g) in %.0f s", args.out, threshold, time.monotonic() - t0)
    out: Path = args.out
    return out


def load_scorer(model_dir: Path) -> AutoencoderScorer:
    """The torch AutoencoderScorer of an exported autoencoder, from its weights.pt (eval mode, CPU)."""
    weights = torch.load(Path(model_dir) / "weights.pt", map_location="cpu", weights_only=False)
    scorer = build_scorer(weights["args"])
    scorer.load_state_dict(weights["scorer"])
    return scorer.eval()


def run_cli(args: argparse.Namespace) -> int:
    """Entry point for `gatekeeper train autoencoder`."""
    try:
        train_autoencoder(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m models.detector baseline-ae ...` — the same command without the service CLI."""
    parser = argparse.ArgumentParser(prog="python -m models.detector baseline-ae", description=__doc__.splitlines()[0])
    add_autoencoder_arguments(parser)
    args = parser.parse_args(argv)
    try:
        train_autoencoder(args)
    except ValueError as exc:
        print(f"baseline-ae: error: {exc}", file=sys.stderr)
        return 2
    return 0
