"""`gatekeeper train segmenter`: train the liver U-Net, pick the best validation state, export ONNX + model.json.

    gatekeeper train segmenter --data DIR --out DIR [--recipe phantom|synth] [--pixel-spacing MM]
        [--size 128] [--steps 2400] [--minutes 60] [--seed 0]

Recipe `phantom`: training slices are drawn from --data's contoured series, with liver three times out
of four (the rest teach it where no liver is), augmented on the fly (small affine warp, contrast and
noise). Recipe `synth` (domain randomisation, `models.segmenter.synth`): slices are rendered from
phantom tissue maps with random appearance, acquisition and framing; --data then gives only the
validation series. Both are fitted with cross-entropy + soft Dice. The learning rate follows a cosine over `--steps`; `--minutes` is a
hard cap. Every `--val-every` steps the 3-D Dice of each validation series is measured (at the
network's size, after the same post-processing as serving) and the best state is kept. One
checkpoint dict (network, optimiser, step, best state, args) makes a run resumable.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from models.detector.data import cpu_count
from models.segmenter.data import SegDataset, SegSeries, load_dataset
from models.segmenter.network import SegmenterExport, UNet
from service import imaging
from service.errors import UsageError
from service.segmentation import KIND, SegmenterInput, context_stack, dice, file_version, largest_component

log = logging.getLogger(__name__)

WINDOW = imaging.Window(center=50.0, width=500.0)  # liver against fat, vessels and bone
LIVER_FRACTION = 0.75
#: The synth recipe's default field pixel size: 128 × 3.2 mm = a 410-mm field (coarser for wider bodies).
SYNTH_PIXEL_SPACING_MM = 3.2
#: The synth recipe's phantom patients: seeds from here on, disjoint from every phantom dataset's patients
#: (standard [0, 5e5), large [5e5, 1e6), clinic [1e6, 2e6)).
SYNTH_PATIENT_SEED = 3_000_000
#: Randomised slices from patients of their own that pick the best state with the phantom validation series.
SYNTH_VALIDATION_SLICES = 96

#: Makes a batch drawer from the run's (checkpointed) generator: n → (image [n, C, S, S], liver [n, S, S]).
DrawFactory = Callable[[torch.Generator], Callable[[int], tuple[torch.Tensor, torch.Tensor]]]


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random small affine warp (same for image stack and mask), contrast/brightness jitter and noise."""
    n = x.shape[0]
    u = torch.rand(n, 5, generator=gen)
    scale = 0.88 + 0.24 * u[:, 0]
    angle = (u[:, 1] - 0.5) * math.radians(20)
    tx, ty = (u[:, 2] - 0.5) * 0.12, (u[:, 3] - 0.5) * 0.12
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
    gain = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.2
    bias = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.06
    noise = torch.randn(x.shape, generator=gen) * (0.03 * u[:, 4]).view(n, 1, 1, 1)
    return (x * gain + bias + noise).clamp(0, 1.2), y.long()


class SliceSampler:
    """Draws (series, slice) pairs: with liver `LIVER_FRACTION` of the time, uniformly otherwise."""

    def __init__(self, series: list[SegSeries], rng: np.random.Generator) -> None:
        self.series = series
        self.rng = rng
        self.liver = [(si, int(k)) for si, s in enumerate(series) for k in np.flatnonzero(s.liver.any(axis=(1, 2)))]
        self.all = [(si, k) for si, s in enumerate(series) for k in range(s.num_slices)]
        if not self.liver:
            raise ValueError("no training slice contains liver; check the contours")

    def batch(self, n: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for _ in range(n):
            pool = self.liver if self.rng.random() < LIVER_FRACTION else self.all
            si, k = pool[int(self.rng.integers(len(pool)))]
            s = self.series[si]
            xs.append(context_stack(s.volume, np.array([k]), context)[0].astype(np.float32))
            ys.append(s.liver[k])
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice of the liver class over the batch."""
    ce = F.cross_entropy(logits, target)
    p = torch.softmax(logits, 1)[:, 1]
    t = target.float()
    soft_dice = (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return ce + (1 - soft_dice)


@torch.inference_mode()
def predict_volume(net: UNet, volume: np.ndarray, context: int, device: torch.device, batch: int = 32) -> np.ndarray:
    """Liver probability [k, S, S] of a prepared series."""
    net.eval()
    out = []
    for start in range(0, volume.shape[0], batch):
        idx = np.arange(start, min(start + batch, volume.shape[0]))
        x = torch.from_numpy(context_stack(volume, idx, context).astype(np.float32)).to(device)
        out.append(torch.softmax(net(x), 1)[:, 1].float().cpu().numpy())
    net.train()
    return np.concatenate(out)


def validate(net: UNet, series: list[SegSeries], context: int, device: torch.device) -> list[float]:
    """3-D Dice per validation series at network size, after serving's post-processing."""
    return [dice(largest_component(predict_volume(net, s.volume, context, device) > 0.5), s.liver) for s in series]


def export(net: UNet, spec: SegmenterInput, out: Path) -> float:
    """Write out/segmenter.onnx; return the max relative difference ORT vs torch on random input."""
    import onnxruntime as ort

    wrapper = SegmenterExport(net.cpu().eval())
    example = torch.rand(2, spec.channels, spec.size, spec.size)
    path = out / "segmenter.onnx"
    torch.onnx.export(
        wrapper,
        (example,),
        str(path),
        input_names=["image"],
        output_names=["probability", "features"],
        dynamic_axes={"image": {0: "batch"}, "probability": {0: "batch"}, "features": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    x = torch.rand(3, spec.channels, spec.size, spec.size)
    with torch.inference_mode():
        ref = [t.numpy() for t in wrapper(x)]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    return max(float(np.abs(g - r).max() / (np.abs(r).max() + 1e-12)) for g, r in zip(got, ref))


@dataclass(frozen=True)
class Schedule:
    """How long and how fast one training run goes: steps, peak learning rate (cosine), validation interval."""

    steps: int
    lr: float
    val_every: int

    def __post_init__(self) -> None:
        if self.steps < 1 or self.val_every < 1:
            raise ValueError(f"steps and val_every must be >= 1, got {self.steps} and {self.val_every}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")


def write_model_json(
    out: Path,
    *,
    args: argparse.Namespace,
    net: UNet,
    spec: SegmenterInput,
    data: SegDataset,
    schedule: Schedule,
    metrics: dict[str, Any],
    parity: float,
    data_hash: str,
    training_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write out/model.json (the contract of `service.segmentation`); `training_extra` joins its `training`."""
    meta = {
        "format": 1,
        "kind": KIND,
        "name": "gatekeeper-liver-unet",
        "file": "segmenter.onnx",
        "version": file_version(out / "segmenter.onnx"),
        "input": {
            "size": spec.size,
            "context_slices": spec.context_slices,
            "window_center_hu": spec.window.center,
            "window_width_hu": spec.window.width,
            "resize": "area average (service.imaging.resize)"
            if spec.pixel_spacing_mm is None
            else "body-centred field of pixel_spacing_mm pixels, linear (service.segmentation.frame_series)",
            **({} if spec.pixel_spacing_mm is None else {"pixel_spacing_mm": spec.pixel_spacing_mm}),
            "order": "head to feet",
        },
        "outputs": {
            "probability": "liver probability of the middle slice [N, S, S]",
            "features": f"bottleneck features [N, {net.feature_dim}]",
        },
        "threshold": 0.5,
        "postprocessing": "resample to the series matrix, cut at threshold, largest 3-D component, fill holes",
        "segment": {"label": "Liver", "scheme": "SCT", "code": "10200004", "meaning": "Liver"},
        "network": {"family": "unet-2.5d", "base": net.head.in_channels, "depth": len(net.up)},
        "metrics": metrics,
        "onnx_parity_max_rel_error": parity,
        "training": {
            "data": data.source,
            "data_hash": data_hash,
            "data_command": _data_command(Path(data.source)),
            "train_series": len(data.train),
            "validation_series": len(data.validation),
            "trained_on_series": sorted(s.series_instance_uid for s in data.train),
            "calibrated_on_series": sorted(s.series_instance_uid for s in data.validation),
            "train_slices": sum(s.num_slices for s in data.train),
            "command": "gatekeeper train segmenter " + " ".join(shlex.quote(a) for a in sys.argv[3:])
            if sys.argv[1:3] == ["train", "segmenter"]
            else " ".join(shlex.quote(a) for a in sys.argv),
            "seed": args.seed,
            "steps": schedule.steps,
            "batch": args.batch,
            "lr": schedule.lr,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(),
            **(training_extra or {}),
        },
    }
    (out / "model.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _data_command(root: Path) -> str | None:
    """The command that made the training data, when it is a phantom run (its manifest says)."""
    try:
        command: str | None = json.loads((root / "manifest.json").read_text()).get("command")
        return command
    except (OSError, ValueError):
        return None


def prepare_run(args: argparse.Namespace) -> torch.device:
    """Check the options every training run shares; set torch's threads and seed; return the device.

    Raises:
        UsageError: an impossible option (the message names it).
    """
    if not args.data.is_dir():
        raise UsageError(f"--data {args.data}: no such folder")
    if args.batch < 1:
        raise UsageError("--batch must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device available to torch")
    torch.manual_seed(args.seed)
    return device


def run_cli(args: argparse.Namespace) -> int:
    if args.size % 16 or args.size < 32:
        raise UsageError(f"--size must be a multiple of 16 and >= 32, got {args.size}")
    if args.steps < 1:
        raise UsageError("--steps must be >= 1")
    if args.pixel_spacing is not None and not args.pixel_spacing > 0:
        raise UsageError(f"--pixel-spacing must be > 0 mm, got {args.pixel_spacing}")
    device = prepare_run(args)
    pixel = args.pixel_spacing
    if pixel is None and args.recipe == "synth":
        pixel = SYNTH_PIXEL_SPACING_MM
    spec = SegmenterInput(size=args.size, context_slices=args.context, window=WINDOW, pixel_spacing_mm=pixel)
    args.out.mkdir(parents=True, exist_ok=True)
    synth = args.recipe == "synth"
    try:
        data = load_dataset(
            args.data,
            spec,
            jobs=args.jobs or cpu_count(),
            seed=args.seed,
            max_series=args.max_series,
            min_train=0 if synth else 2,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    net = UNet(in_channels=spec.channels, base=args.base)
    draw_factory: DrawFactory | None = None
    extra_validation: Callable[[UNet], float] | None = None
    training_extra: dict[str, Any] = {"recipe": args.recipe}
    if synth:
        draw_factory, extra_validation, training_extra = synth_recipe(args, spec, device)
    fit_and_export(
        args,
        net=net,
        spec=spec,
        data=data,
        device=device,
        schedule=Schedule(steps=args.steps, lr=args.lr, val_every=args.val_every),
        training_extra=training_extra,
        draw_factory=draw_factory,
        extra_validation=extra_validation,
    )
    return 0


def synth_recipe(
    args: argparse.Namespace, spec: SegmenterInput, device: torch.device
) -> tuple[DrawFactory, Callable[[UNet], float], dict[str, Any]]:
    """The synth recipe's batch drawer, its randomised validation and what model.json records of it.

    The tissue bank is rendered once (`--bank-patients` × `--bank-per-patient` stacks, cached in
    --out/bank.npz for --resume); a tenth of its patients (at least 2) give the fixed validation slices.
    """
    from models.segmenter.synth import Randomiser, SynthBank, render_bank

    n_val = max(2, args.bank_patients // 10)
    seeds = [SYNTH_PATIENT_SEED + i for i in range(args.bank_patients + n_val)]
    path = args.out / "bank.npz"
    if args.resume and path.is_file():
        bank = SynthBank.load(path)
    else:
        t0 = time.monotonic()
        bank = render_bank(seeds, args.bank_per_patient, jobs=args.jobs or cpu_count())
        bank.save(path)
        log.info("rendered %d tissue stacks of %d patients in %.0f s", len(bank), len(seeds), time.monotonic() - t0)
    val_seeds = set(seeds[args.bank_patients :])
    is_val = np.isin(bank.patient, list(val_seeds))
    train_bank = SynthBank(bank.tissue[~is_val], bank.texture[~is_val], bank.liver[~is_val], bank.patient[~is_val])
    val_bank = SynthBank(bank.tissue[is_val], bank.texture[is_val], bank.liver[is_val], bank.patient[is_val])
    val_x, val_y = Randomiser(val_bank, spec, torch.Generator().manual_seed(args.seed + 7)).batch(
        SYNTH_VALIDATION_SLICES
    )

    def make_draw(gen: torch.Generator) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
        return Randomiser(train_bank, spec, gen).batch

    @torch.inference_mode()
    def synthetic_dice(net: UNet) -> float:
        """Mean 2-D Dice over the randomised validation slices that hold liver."""
        net.eval()
        pred = torch.cat([net(val_x[i : i + 32].to(device)).argmax(1).cpu() for i in range(0, len(val_x), 32)])
        net.train()
        keep = val_y.flatten(1).any(1)
        return float(np.mean([dice(p.numpy(), t.numpy()) for p, t in zip(pred[keep], val_y[keep])]))

    extra = {
        "recipe": "synth",
        "domain_randomisation": {
            "module": "models.segmenter.synth",
            "bank_patients": args.bank_patients,
            "bank_per_patient": args.bank_per_patient,
            "validation_patients": n_val,
            "patient_seeds": f"{SYNTH_PATIENT_SEED} … {SYNTH_PATIENT_SEED + len(seeds) - 1}",
            "appearance": "per-tissue HU of a random phase (non-contrast, arterial, portal-venous, delayed) or "
            "fully random soft tissue; texture ×0.4–3; metal; bias ±25 HU; blur 0.3–3 mm; noise 3–45 HU, "
            "sharp to smooth; reconstruction circle 250–500 mm or a cut field; gamma",
            "geometry": "slice spacing 1–5 mm; body-centred field, scale ×exp(N(0, 0.08)), rotation ±8°, "
            "shift ±4 px, elastic warp; varied liver size, left lobe, tip and deformation",
            "realistic_fraction": 0.25,
            "selection": "best mean of the phantom validation series' Dice and the randomised validation slices' Dice",
        },
    }
    return make_draw, synthetic_dice, extra


@dataclass
class _Fit:
    """The state of one training run that a checkpoint keeps: the network, its optimiser, the step,
    the best validation score so far with its weights, the validation history and both random states."""

    net: UNet
    opt: torch.optim.Optimizer
    rng: np.random.Generator
    gen: torch.Generator
    ckpt_path: Path
    step: int = 0
    best: float = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    t0: float = 0.0

    def resume(self) -> None:
        """Continue from `ckpt_path` (every state as saved)."""
        ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        self.net.load_state_dict(ckpt["net"])
        self.opt.load_state_dict(ckpt["opt"])
        self.step, self.best, self.best_state = ckpt["step"], ckpt["best"], ckpt["best_state"]
        self.history = ckpt["history"]
        self.rng.bit_generator.state = ckpt["rng"]
        self.gen.set_state(ckpt["gen"])
        log.info("resumed at step %d (best validation Dice %.4f)", self.step, self.best)

    def save(self, args: argparse.Namespace) -> None:
        """Write the checkpoint atomically (a .tmp file, then a rename)."""
        tmp = self.ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "net": self.net.state_dict(),
                "opt": self.opt.state_dict(),
                "step": self.step,
                "best": self.best,
                "best_state": self.best_state,
                "history": self.history,
                "rng": self.rng.bit_generator.state,
                "gen": self.gen.get_state(),
                "args": vars(args) | {"data": str(args.data), "out": str(args.out)},
            },
            tmp,
        )
        tmp.replace(self.ckpt_path)

    def check(
        self,
        data: SegDataset,
        spec: SegmenterInput,
        device: torch.device,
        extra_validation: Callable[[UNet], float] | None,
    ) -> None:
        """Validate now, log it in `history`, and keep the weights when the score is the best so far."""
        scores = validate(self.net, data.validation, spec.context_slices, device)
        mean = float(np.mean(scores))
        entry = {
            "step": self.step,
            "validation_dice_mean": mean,
            "validation_dice_min": float(np.min(scores)),
            "seconds": round(time.monotonic() - self.t0, 1),
        }
        score = mean
        if extra_validation is not None:
            entry["synthetic_dice_mean"] = extra_validation(self.net)
            score = (mean + entry["synthetic_dice_mean"]) / 2.0
        self.history.append(entry)
        log.info(
            "step %d: %s",
            self.step,
            ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k.endswith(("mean", "min"))),
        )
        if score > self.best:
            self.best = score
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}


def _train_steps(
    fit: _Fit,
    args: argparse.Namespace,
    schedule: Schedule,
    draw: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    validation: Callable[[], None],
) -> None:
    """Cosine-scheduled AdamW steps until `schedule.steps` or `args.minutes`; validate every
    `schedule.val_every` steps and at the end, checkpoint every `args.checkpoint_every` seconds."""
    fit.t0 = time.monotonic()
    last_ckpt = fit.t0
    bar = tqdm(total=schedule.steps, initial=fit.step, desc="segmenter", unit="step", disable=args.no_progress)
    fit.net.train()
    while fit.step < schedule.steps:
        if time.monotonic() - fit.t0 > args.minutes * 60:
            log.warning("time cap of %.0f min reached at step %d of %d", args.minutes, fit.step, schedule.steps)
            break
        for group in fit.opt.param_groups:
            group["lr"] = schedule.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * fit.step / schedule.steps)))
        x, y = draw(args.batch)
        loss = loss_fn(fit.net(x.to(device)), y.to(device))
        fit.opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
        fit.opt.step()
        fit.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if fit.step % schedule.val_every == 0:
            validation()
        if time.monotonic() - last_ckpt > args.checkpoint_every:
            fit.save(args)
            last_ckpt = time.monotonic()
    bar.close()
    if not fit.history or fit.history[-1]["step"] != fit.step:
        validation()
    fit.save(args)


def fit_and_export(
    args: argparse.Namespace,
    *,
    net: UNet,
    spec: SegmenterInput,
    data: SegDataset,
    device: torch.device,
    schedule: Schedule,
    training_extra: dict[str, Any] | None = None,
    draw_factory: DrawFactory | None = None,
    extra_validation: Callable[[UNet], float] | None = None,
) -> dict[str, Any]:
    """Train `net` (from its current weights) on `data`, keep the best validation state, export to `args.out`.

    Batches come from `draw_factory` when given, else from `data.train` (`SliceSampler` + `augment`);
    with `extra_validation` the best state is the best mean of it and the validation series' Dice.
    Writes checkpoint.pt (resumable with `args.resume`), segmenter.onnx, model.json and weights.pt;
    returns the model.json written.
    """
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    data_hash = data.data_hash()
    if draw_factory is not None:
        draw = draw_factory(gen)
    else:
        sampler = SliceSampler(data.train, rng)

        def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = sampler.batch(n, spec.context_slices)
            return augment(x, y, gen)

    net = net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=schedule.lr, weight_decay=1e-4)
    fit = _Fit(net, opt, rng, gen, args.out / "checkpoint.pt")
    if args.resume and fit.ckpt_path.is_file():
        fit.resume()
    _train_steps(fit, args, schedule, draw, device, lambda: fit.check(data, spec, device, extra_validation))
    assert fit.best_state is not None  # check() has run, and any Dice (>= 0) beats the initial best of -1
    net.load_state_dict(fit.best_state)
    scores = validate(net, data.validation, spec.context_slices, device)
    metrics = {
        "validation_dice_mean": float(np.mean(scores)),
        "validation_dice_min": float(np.min(scores)),
        "validation_dice_per_series": [round(s, 4) for s in scores],
        "history": fit.history,
        "trained_steps": fit.step,
        "training_seconds": round(time.monotonic() - fit.t0, 1),
    }
    parity = export(net, spec, args.out)
    meta = write_model_json(
        args.out,
        args=args,
        net=net,
        spec=spec,
        data=data,
        schedule=schedule,
        metrics=metrics,
        parity=parity,
        data_hash=data_hash,
        training_extra=training_extra,
    )
    torch.save(
        {"net": net.state_dict(), "args": vars(args) | {"data": str(args.data), "out": str(args.out)}},
        args.out / "weights.pt",
    )
    log.info(
        "segmenter written to %s: validation Dice %.4f (min %.4f), version %s, ONNX parity %.2e",
        args.out,
        metrics["validation_dice_mean"],
        metrics["validation_dice_min"],
        meta["version"],
        parity,
    )
    return meta
