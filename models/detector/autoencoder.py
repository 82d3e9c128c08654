"""`gatekeeper train autoencoder`: the convolutional-autoencoder baseline of the detector evaluation.

A plain conv autoencoder (no position condition, no adversary) trained on the same normal slices
as the detector, at the detector's size and with its preprocessing (`service.imaging.
preprocess_slices`). Its reconstruction error is the classic alternative to the GAN: if the GAN
does not beat it, the GAN is not worth its cost.

* slice score = (e − μ)/σ with e the mean squared error |x − AE(x)|² inside the body mask, μ and σ
  measured on the validation normal slices (≈ 0 typical, larger = more unusual);
* series score = the `--aggregation` of the slice scores; threshold = the smallest that flags at
  most `--false-flag-rate` of the validation normal series (normals only, as for the detector).

Writes to `--out`: `autoencoder.onnx` (image [N,1,S,S], mask [N,1,S,S] → score [N], error [N],
residual_map [N,1,S,S]; opset 17, dynamic batch), `model.json` (kind `ct-slice-autoencoder`) and
`weights.pt` (state dict + args, for the parity test). Scored without torch by
`models.detector.baselines.AutoencoderBaseline`.
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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.detector.baselines import AUTOENCODER_KIND
from models.detector.config import add_autoencoder_arguments
from models.detector.data import SeriesData, cpu_count, load_dataset
from models.detector.export import OPSET, export_graph
from models.detector.metrics import threshold_at_false_flag_rate
from service import imaging
from service.errors import UsageError

log = logging.getLogger(__name__)


class ConvAutoencoder(nn.Module):
    """Image [N,1,S,S] in [-1, 1] → reconstruction: four stride-2 convs down to S/16, a dense
    bottleneck of `latent` numbers (so it cannot copy its input), and the mirror image up."""

    def __init__(self, size: int, *, latent: int = 128, width: int = 32) -> None:
        super().__init__()
        if size % 16:
            raise ValueError(f"size must be a multiple of 16, got {size}.")
        chans = [1, width, 2 * width, 4 * width, 4 * width]
        down: list[nn.Module] = []
        for a, b in zip(chans, chans[1:]):
            down += [nn.Conv2d(a, b, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        self.down = nn.Sequential(*down)
        self.grid = size // 16
        flat = chans[-1] * self.grid * self.grid
        self.to_latent = nn.Linear(flat, latent)
        self.from_latent = nn.Linear(latent, flat)
        up: list[nn.Module] = []
        rev = chans[::-1]
        for i, (a, b) in enumerate(zip(rev, rev[1:])):
            last = i == len(rev) - 2
            up += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(a, b, 3, padding=1)]
            if not last:
                up.append(nn.LeakyReLU(0.2))
        self.up = nn.Sequential(*up)
        self.channels = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.to_latent(self.down(x).flatten(1))
        h = F.leaky_relu(self.from_latent(z), 0.2).reshape(-1, self.channels, self.grid, self.grid)
        return torch.tanh(self.up(h))


class AutoencoderScorer(nn.Module):
    """(image, body mask) → normalised slice score, raw error, residual map (what `autoencoder.onnx` computes)."""

    norm: torch.Tensor  # buffer [2]

    def __init__(self, ae: ConvAutoencoder) -> None:
        super().__init__()
        self.ae = ae
        self.register_buffer("norm", torch.tensor([0.0, 1.0]))  # μ, σ of the error on validation normals

    def errors(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        diff = (x - self.ae(x)) * mask
        area = mask.sum(dim=(1, 2, 3)).clamp(min=1.0)
        return (diff * diff).sum(dim=(1, 2, 3)) / area, diff.abs()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        error, residual_map = self.errors(x, mask)
        return (error - self.norm[0]) / self.norm[1], error, residual_map


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
    images = torch.from_numpy(np.concatenate([s.images for s in data.train])[:, None]).to(device)
    n = images.shape[0]
    scorer = AutoencoderScorer(ConvAutoencoder(args.size, latent=args.latent)).to(device)
    opt = torch.optim.Adam(scorer.ae.parameters(), lr=1e-3)
    rng = torch.Generator(device="cpu").manual_seed(args.seed)
    history: list[float] = []
    step, last_log, budget = 0, time.monotonic(), args.minutes * 60.0
    t_train = time.monotonic()
    scorer.train()
    while (step < args.steps) if args.steps is not None else (time.monotonic() - t_train < budget):
        idx = torch.randint(n, (args.batch,), generator=rng).to(device)
        x = images[idx].float()
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
    log.info("autoencoder: %d steps in %.0f s", step, train_seconds)

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
    w = max(1, len(history) // 10)
    command = "gatekeeper train autoencoder " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k not in ("func", "command", "what", "verbose") and v not in (None, False)
    )
    model = {
        "format": 1,
        "kind": AUTOENCODER_KIND,
        "size": args.size,
        "latent": args.latent,
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
            "steps": step,
            "batch": args.batch,
            "train_seconds": round(train_seconds, 1),
            "wall_seconds": round(time.monotonic() - t0, 1),
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
    (args.out / "model.json").write_text(json.dumps(model, indent=1))
    log.info("autoencoder written to %s (threshold %.4g) in %.0f s", args.out, threshold, time.monotonic() - t0)
    out: Path = args.out
    return out


def load_scorer(model_dir: Path) -> AutoencoderScorer:
    """The torch AutoencoderScorer of an exported autoencoder, from its weights.pt (eval mode, CPU)."""
    weights = torch.load(Path(model_dir) / "weights.pt", map_location="cpu", weights_only=False)
    a = weights["args"]
    scorer = AutoencoderScorer(ConvAutoencoder(int(a["size"]), latent=int(a["latent"])))
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
