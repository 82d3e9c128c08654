"""`gatekeeper train detector`: train, calibrate and export the slice-position-conditioned detector.

Phases, each with its share of the time budget (`--minutes`) or a fixed number of steps:

1. `position` — body-part regression (Yan et al. 2018) on the normal training series, from slice
   order and spacing only (skipped with `--position naive`, which uses 0…1 within the series);
2. `gan` — generator and discriminator: non-saturating logistic loss, lazy R1 on reals,
   DiffAugment (translation, cutout), EMA of the generator;
3. `encoder` — f-AnoGAN izi_f with G_ema and D frozen: pixel residual + κ·feature residual;
4. calibration on the validation normals, then export (`export.py`) and `model.json`.

One checkpoint dict (`checkpoint.pt`: G, D, G_ema, E, P, their optimizers, steps per phase,
elapsed time per phase, args) is written after every phase and every `--checkpoint-every`
seconds; `--resume` continues from it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.detector.config import add_arguments
from models.detector.data import Dataset, SeriesData, cpu_count, load_dataset
from models.detector.onnx_graph import OPSET
from models.detector.stylegan2 import calibrate as cal
from models.detector.stylegan2 import losses
from models.detector.stylegan2.export import export_onnx
from models.detector.stylegan2.networks import BodyPartRegressor, Scorer, build_networks
from service import imaging
from service.errors import UsageError

log = logging.getLogger(__name__)

#: Body-part regression output grows by 1 per this many mm from head to feet.
MM_PER_UNIT = 100.0
#: Share of the time budget per phase (position, gan, encoder); the rest is calibration and export.
PHASE_SHARE = {"position": 0.08, "gan": 0.64, "encoder": 0.22}
PHASES = ("position", "gan", "encoder")
MODEL_FORMAT = 1


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the option when an argument is impossible."""
    if args.batch < 4 or args.batch % 4:
        raise ValueError(f"--batch must be a multiple of 4, got {args.batch}")
    if not args.minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    if not 0 <= args.false_flag_rate < 1:
        raise ValueError(f"--false-flag-rate must be within [0, 1), got {args.false_flag_rate}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    if not args.data.is_dir():
        raise ValueError(f"--data {args.data} is not a folder")
    if (args.out / "checkpoint.pt").exists() and not args.resume:
        raise ValueError(f"--out {args.out} holds a checkpoint; pass --resume to continue it or choose another folder")


class _Clock:
    """Time spent per phase, carried across resumes."""

    def __init__(self, elapsed: dict[str, float]) -> None:
        self.elapsed = dict(elapsed)
        self._start: float | None = None
        self._phase = ""

    def start(self, phase: str) -> None:
        self._phase, self._start = phase, time.monotonic()
        self.elapsed.setdefault(phase, 0.0)

    def spent(self) -> float:
        assert self._start is not None
        return self.elapsed[self._phase] + time.monotonic() - self._start

    def stop(self) -> None:
        self.elapsed[self._phase] = self.spent()
        self._start = None


class Trainer:
    """Holds every network, optimizer and counter of one training run (the checkpoint dict's content)."""

    def __init__(self, args: argparse.Namespace, data: Dataset, device: torch.device) -> None:
        self.args, self.data, self.device = args, data, device
        torch.manual_seed(args.seed)
        nets = build_networks(args.family, args.size, conditioned=not args.unconditioned)
        self.G, self.D, self.E = nets.G.to(device), nets.D.to(device), nets.E.to(device)
        self.G_ema = copy.deepcopy(self.G).eval()
        use_bpr = args.position == "bpr" and not args.unconditioned
        self.P = BodyPartRegressor(args.size).to(device) if use_bpr else None
        self.diverged = False
        style = args.family == "stylegan2"
        self.r1_every = 16
        lr, betas = (0.002, (0.0, 0.99)) if style else (0.0002, (0.5, 0.999))
        c = self.r1_every / (self.r1_every + 1)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=lr, betas=betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=lr * c, betas=(betas[0] ** c, betas[1] ** c))
        self.opt_E = torch.optim.Adam(self.E.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_P = torch.optim.Adam(self.P.parameters(), lr=1e-3) if self.P is not None else None
        self.r1_gamma = 0.0002 * args.size**2 / args.batch if style else 0.1
        self.steps = {phase: 0 for phase in PHASES}
        self.history: dict[str, list[list[float]]] = {phase: [] for phase in PHASES}
        self.done: list[str] = []
        self.position_norm = {"lo": 0.0, "hi": 1.0}
        self.clock = _Clock({})
        self.rng = torch.Generator(device="cpu").manual_seed(args.seed)

    # --- checkpoint -----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        opt = {"G": self.opt_G.state_dict(), "D": self.opt_D.state_dict(), "E": self.opt_E.state_dict()}
        if self.opt_P is not None:
            opt["P"] = self.opt_P.state_dict()
        return {
            "format": MODEL_FORMAT,
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "E": self.E.state_dict(),
            "P": self.P.state_dict() if self.P is not None else None,
            "optimizers": opt,
            "step": dict(self.steps),
            "done": list(self.done),
            "elapsed": dict(self.clock.elapsed),
            "history": self.history,
            "position_norm": dict(self.position_norm),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items() if k != "func"},
            "rng": self.rng.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def save(self) -> None:
        path = self.args.out / "checkpoint.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)

    def load(self, state: dict[str, Any]) -> None:
        for name in ("G", "D", "G_ema", "E"):
            getattr(self, name).load_state_dict(state[name])
        if self.P is not None and state.get("P") is not None:
            self.P.load_state_dict(state["P"])
        self.opt_G.load_state_dict(state["optimizers"]["G"])
        self.opt_D.load_state_dict(state["optimizers"]["D"])
        self.opt_E.load_state_dict(state["optimizers"]["E"])
        if self.opt_P is not None and "P" in state["optimizers"]:
            self.opt_P.load_state_dict(state["optimizers"]["P"])
        self.steps.update(state["step"])
        self.done = list(state["done"])
        self.clock = _Clock(state["elapsed"])
        self.history = state["history"]
        self.position_norm = state["position_norm"]
        self.rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])

    # --- helpers --------------------------------------------------------------------------------------
    def _budget(self, phase: str) -> float:
        return float(self.args.minutes * 60.0 * PHASE_SHARE[phase])

    def _max_steps(self, phase: str) -> int | None:
        cap: int | None = getattr(self.args, f"{phase}_steps")
        return cap

    def _running(self, phase: str) -> bool:
        cap = self._max_steps(phase)
        if cap is not None:
            return self.steps[phase] < cap
        return self.clock.spent() < self._budget(phase)

    def _bar(self, phase: str) -> Any:  # a tqdm bar (tqdm ships no type information)
        from tqdm import tqdm

        return tqdm(
            total=self._max_steps(phase),
            initial=self.steps[phase],
            desc=phase,
            unit="step",
            disable=self.args.no_progress or not sys.stderr.isatty(),
            dynamic_ncols=True,
            leave=False,
        )

    def _log_progress(self, phase: str, values: dict[str, torch.Tensor], last: list[float]) -> None:
        """Log a line every 15 s and checkpoint every --checkpoint-every s (tensors are read only then)."""
        now = time.monotonic()
        if now - last[0] >= 15.0:
            last[0] = now
            pretty = " ".join(f"{k} {float(v):.4f}" for k, v in values.items())
            log.info("%s step %d (%.0f s): %s", phase, self.steps[phase], self.clock.spent(), pretty)
        if now - last[1] >= self.args.checkpoint_every:
            last[1] = now
            self.save()

    # --- positions ------------------------------------------------------------------------------------
    @torch.no_grad()
    def raw_positions(self, s: SeriesData, batch: int = 256) -> np.ndarray:
        assert self.P is not None
        self.P.eval()
        out = []
        for i in range(0, s.num_slices, batch):
            x = torch.from_numpy(s.images[i : i + batch].astype(np.float32)).to(self.device)[:, None]
            out.append(self.P(x).float().cpu().numpy())
        self.P.train()
        return np.concatenate(out)

    def positions(self, s: SeriesData) -> np.ndarray:
        """The conditioning position of every slice of `s` (what serving computes from model.json)."""
        if self.P is None:
            return s.naive_positions()
        fitted = imaging.fit_series_positions(self.raw_positions(s), s.locations_mm, MM_PER_UNIT)
        lo, hi = self.position_norm["lo"], self.position_norm["hi"]
        return ((fitted - lo) / (hi - lo)).astype(np.float32)

    def train_position(self) -> None:
        assert self.P is not None and self.opt_P is not None
        series = [s for s in self.data.train if s.num_slices >= 8]
        if not series:
            raise ValueError("body-part regression needs training series of at least 8 slices")
        m, batch = 8, max(4, self.args.batch // 8)
        bar, last = self._bar("position"), [time.monotonic(), time.monotonic()]
        self.clock.start("position")
        while self._running("position"):
            xs, metric = [], []
            for _ in range(batch):
                s = series[int(torch.randint(len(series), (1,), generator=self.rng))]
                k = s.num_slices
                stride = int(torch.randint(1, max(2, (k - 1) // (m - 1) + 1), (1,), generator=self.rng))
                start = int(torch.randint(0, k - (m - 1) * stride, (1,), generator=self.rng))
                idx = start + stride * np.arange(m)
                xs.append(s.images[idx])
                metric.append(np.abs(s.locations_mm[idx] - s.locations_mm[idx[0]]) / MM_PER_UNIT)
            x = torch.from_numpy(np.stack(xs).astype(np.float32)).to(self.device).reshape(-1, 1, *xs[0].shape[1:])
            x = losses.diff_augment(x, "translation")
            scores = self.P(x).reshape(batch, m)
            order, distance = losses.bpr_losses(scores, torch.from_numpy(np.stack(metric)).float().to(self.device))
            loss = 0.1 * order + distance
            self.opt_P.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
            self.opt_P.step()
            self.steps["position"] += 1
            self.history["position"].append([self.steps["position"], loss.item()])
            bar.update(1)
            self._log_progress(
                "position", {"loss": loss.detach(), "order": order.detach(), "distance": distance.detach()}, last
            )
        self.clock.stop()
        bar.close()
        fitted = np.concatenate(
            [imaging.fit_series_positions(self.raw_positions(s), s.locations_mm, MM_PER_UNIT) for s in self.data.train]
        )
        lo, hi = np.percentile(fitted, [1, 99])
        self.position_norm = {"lo": float(lo), "hi": float(max(hi, lo + 1e-3))}
        log.info("position: %d steps, normalisation %s", self.steps["position"], self.position_norm)

    # --- GAN ------------------------------------------------------------------------------------------
    def _slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        imgs = np.concatenate([s.images for s in self.data.train])[:, None]
        pos = np.concatenate([self.positions(s) for s in self.data.train])
        return torch.from_numpy(imgs).to(self.device), torch.from_numpy(pos).float().to(self.device)

    def _ema(self, cur_nimg: int) -> None:
        ema_nimg = min(10_000.0, cur_nimg * 0.05)
        beta = 0.5 ** (self.args.batch / max(ema_nimg, 1e-8))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.G_ema.parameters()), list(self.G.parameters()), 1.0 - beta)
            for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
                if b.dtype.is_floating_point:
                    b_ema.copy_(b)

    def train_gan(self, images: torch.Tensor, pos: torch.Tensor) -> None:
        B, n = self.args.batch, images.shape[0]
        zdim = self.G.z_dim
        self.G.train()
        self.D.train()
        self.G.noise_mode = "random" if self.args.family == "stylegan2" else "none"
        bar, last = self._bar("gan"), [time.monotonic(), time.monotonic()]
        self.clock.start("gan")
        while self._running("gan"):
            idx = torch.randint(n, (B,), generator=self.rng).to(self.device)
            real, p = images[idx].float(), pos[idx]
            # Discriminator.
            with torch.no_grad():
                fake = self.G(torch.randn(B, zdim, device=self.device), p)
            d_loss = losses.d_logistic_loss(self.D(losses.diff_augment(real), p), self.D(losses.diff_augment(fake), p))
            self.opt_D.zero_grad(set_to_none=True)
            d_loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
            self.opt_D.step()
            r1 = torch.zeros(())
            if self.steps["gan"] % self.r1_every == 0:
                real_r1 = losses.diff_augment(real).detach().requires_grad_(True)
                r1 = losses.r1_penalty(self.D(real_r1, p), real_r1)
                self.opt_D.zero_grad(set_to_none=True)
                (self.r1_gamma / 2 * r1 * self.r1_every).backward()
                self.opt_D.step()
            # Generator.
            idx = torch.randint(n, (B,), generator=self.rng).to(self.device)
            p = pos[idx]
            fake = self.G(torch.randn(B, zdim, device=self.device), p)
            for q in self.D.parameters():
                q.requires_grad_(False)
            g_loss = losses.g_nonsaturating_loss(self.D(losses.diff_augment(fake), p))
            for q in self.D.parameters():
                q.requires_grad_(True)
            self.opt_G.zero_grad(set_to_none=True)
            g_loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
            self.opt_G.step()
            self.steps["gan"] += 1
            self._ema(self.steps["gan"] * B)
            if self.steps["gan"] % 10 == 1:
                self.history["gan"].append([self.steps["gan"], d_loss.item(), g_loss.item(), r1.item()])
                if not all(math.isfinite(v) for v in self.history["gan"][-1][1:]):
                    self.diverged = True
                    log.error(
                        "gan: non-finite loss at step %d (%s); stopping the GAN phase",
                        self.steps["gan"],
                        self.history["gan"][-1],
                    )
                    break
            bar.update(1)
            self._log_progress("gan", {"d": d_loss.detach(), "g": g_loss.detach(), "r1": r1.detach()}, last)
        self.clock.stop()
        bar.close()
        log.info("gan: %d steps in %.0f s", self.steps["gan"], self.clock.elapsed["gan"])

    # --- encoder (izi_f) ------------------------------------------------------------------------------
    def train_encoder(self, images: torch.Tensor, pos: torch.Tensor) -> None:
        B, n = self.args.batch, images.shape[0]
        G, D = self.G_ema.eval(), self.D.eval()
        G.noise_mode = "const"
        for q in list(G.parameters()) + list(D.parameters()):
            q.requires_grad_(False)
        self.E.train()
        bar, last = self._bar("encoder"), [time.monotonic(), time.monotonic()]
        self.clock.start("encoder")
        while self._running("encoder"):
            idx = torch.randint(n, (B,), generator=self.rng).to(self.device)
            x, p = images[idx].float(), pos[idx]
            recon = G(self.E(x, p), p)
            loss = losses.izif_loss(x, recon, D.features(x), D.features(recon), self.args.kappa)
            self.opt_E.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
            self.opt_E.step()
            self.steps["encoder"] += 1
            if self.steps["encoder"] % 5 == 1:
                self.history["encoder"].append([self.steps["encoder"], loss.item()])
            bar.update(1)
            self._log_progress("encoder", {"izi_f": loss.detach()}, last)
        self.clock.stop()
        bar.close()
        for q in list(G.parameters()) + list(D.parameters()):
            q.requires_grad_(True)
        self.D.train()
        log.info("encoder: %d steps in %.0f s", self.steps["encoder"], self.clock.elapsed["encoder"])

    def run(self) -> None:
        """Every phase in order; on resume a phase whose step cap or time share is reached returns at once."""
        if self.P is not None:
            self.train_position()
            self._mark_done("position")
        images, pos = self._slices()
        self.train_gan(images, pos)
        self._mark_done("gan")
        self.train_encoder(images, pos)
        self._mark_done("encoder")

    def _mark_done(self, phase: str) -> None:
        if phase not in self.done:
            self.done.append(phase)
        self.save()

    def scorer(self) -> Scorer:
        G = copy.deepcopy(self.G_ema).eval()
        G.noise_mode = "const"
        E, D = copy.deepcopy(self.E).eval(), copy.deepcopy(self.D).eval()
        return Scorer(G, E, D, kappa=self.args.kappa).to(self.device)


def _position_quality(trainer: Trainer, series: list[SeriesData]) -> dict[str, dict[str, float]]:
    """How well each position method tracks the phantom's true body-axis position (validation only)."""
    truth = [s.true_positions for s in series if s.true_positions is not None]
    if len(truth) < len(series):
        return {}
    t = np.concatenate(truth)
    out: dict[str, dict[str, float]] = {}
    methods = {"naive": [s.naive_positions() for s in series]}
    if trainer.P is not None:
        methods["bpr"] = [trainer.positions(s) for s in series]
    for name, values in methods.items():
        v = np.concatenate(values).astype(np.float64)
        a, b = np.polyfit(v, t, 1)
        rmse = float(np.sqrt(np.mean((a * v + b - t) ** 2)))
        out[name] = {"pearson_r": round(float(np.corrcoef(v, t)[0, 1]), 4), "rmse_after_linear_fit": round(rmse, 4)}
    return out


def _versions() -> dict[str, str]:
    import numpy
    import scipy

    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
    }
    try:
        import onnx

        v["onnx"] = onnx.__version__
    except ImportError:
        pass
    return v


def _curve_summary(history: list[list[float]], col: int = 1) -> dict[str, float]:
    if not history:
        return {}
    vals = np.array([h[col] for h in history])
    w = max(1, len(vals) // 10)
    return {"first": round(float(vals[:w].mean()), 5), "last": round(float(vals[-w:].mean()), 5), "points": len(vals)}


def training_record(
    args: argparse.Namespace,
    trainer: Trainer,
    data: Dataset,
    *,
    command: str,
    device: torch.device,
    data_hash: str,
    t0: float,
    **extra: Any,
) -> dict[str, Any]:
    """model.json's `training` (how, on what, for how long; `extra` added to it), `versions` and `metrics`
    blocks, the same for every family trained by a `Trainer`."""
    return {
        "training": {
            "command": command,
            "seed": args.seed,
            **extra,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "data": str(args.data),
            "data_hash_sha256": data_hash,
            "train_series": len(data.train),
            "train_slices": int(sum(s.num_slices for s in data.train)),
            "validation_series": len(data.validation),
            "trained_on_series": sorted(s.series_instance_uid for s in data.train),
            "calibrated_on_series": sorted(s.series_instance_uid for s in data.validation),
            "skipped_series": data.skipped,
            "steps": trainer.steps,
            "seconds": {k: round(v, 1) for k, v in trainer.clock.elapsed.items()},
            "wall_seconds": round(time.monotonic() - t0, 1),
            "batch": args.batch,
        },
        "versions": _versions(),
        "metrics": {
            "position_loss": _curve_summary(trainer.history["position"]),
            "gan_d_loss": _curve_summary(trainer.history["gan"], 1),
            "gan_g_loss": _curve_summary(trainer.history["gan"], 2),
            "encoder_loss": _curve_summary(trainer.history["encoder"]),
            "position_quality_validation": _position_quality(trainer, data.validation),
            "gan_diverged": trainer.diverged,
        },
    }


def train_detector(args: argparse.Namespace) -> Path:
    """Run every phase, calibrate, export; return the model folder.

    Raises:
        ValueError: impossible arguments or unusable data (message names the option or series).
    """
    if getattr(args, "recipe", "slice") != "slice":
        raise ValueError(
            f"--recipe {args.recipe} is trained by models.detector.patch.train "
            "(gatekeeper train detector, python -m models.detector train)"
        )
    if args.family == "aae":
        raise ValueError("--family aae is a patch-recipe family; use it with --recipe patch")
    check_args(args)
    args.out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(args.out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    try:
        return _train(args)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _train(args: argparse.Namespace) -> Path:
    t0 = time.monotonic()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    log.info(
        "train detector: %s",
        " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "func" and v not in (None, False)
        ),
    )
    # Read the DICOM files (forked worker processes) before CUDA is initialised in this process.
    data = load_dataset(args.data, args.size, jobs=args.jobs or cpu_count(), seed=args.seed, max_series=args.max_series)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    log.info("device %s%s, torch %s", device, name, torch.__version__)
    data_hash = data.data_hash()
    log.info("data loaded in %.1f s, hash %s", time.monotonic() - t0, data_hash[:16])
    trainer = Trainer(args, data, device)
    ckpt = args.out / "checkpoint.pt"
    if args.resume and ckpt.exists():
        trainer.load(torch.load(ckpt, map_location=device, weights_only=False))
        log.info("resumed from %s: steps %s, done %s", ckpt, trainer.steps, trainer.done)
    trainer.run()

    val_positions = [trainer.positions(s) for s in data.validation]
    scorer = trainer.scorer()
    calibration = cal.calibrate(
        scorer,
        data.validation,
        val_positions,
        device,
        kappa=args.kappa,
        false_flag_rate=args.false_flag_rate,
        seed=args.seed,
        by_position=not args.unconditioned,
    )
    paths = export_onnx(scorer, trainer.P, args.size, trainer.G.z_dim, args.out)
    torch.save(
        {
            "G_ema": trainer.G_ema.state_dict(),
            "E": trainer.E.state_dict(),
            "D": trainer.D.state_dict(),
            "P": trainer.P.state_dict() if trainer.P is not None else None,
            "norm_grid": scorer.norm_grid.cpu(),
            "norm_table": scorer.norm_table.cpu(),
            "args": trainer.state()["args"],
        },
        args.out / "weights.pt",
    )

    command = "gatekeeper train detector " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in vars(args).items()
        if k not in ("func", "command", "what", "verbose") and v not in (None, False)
    )
    model = {
        "format": MODEL_FORMAT,
        "kind": "ct-slice-anomaly-detector",
        "family": args.family,
        "conditioned": not args.unconditioned,
        "size": args.size,
        "z_dim": trainer.G.z_dim,
        "kappa": args.kappa,
        "preprocessing": {
            "function": "service.imaging.preprocess_slices",
            "window_center_hu": imaging.ABDOMEN_WINDOW.center,
            "window_width_hu": imaging.ABDOMEN_WINDOW.width,
            "scale": "windowed [0,1] * 2 - 1",
            "body_threshold_hu": imaging.BODY_THRESHOLD_HU,
            "resize": "area average (service.imaging.resize)",
        },
        "position": {
            "method": "naive" if args.unconditioned else args.position,
            "mm_per_unit": MM_PER_UNIT,
            **trainer.position_norm,
        },
        "files": {p.stem: p.name for p in paths},
        "onnx_opset": OPSET,
        **calibration.as_dict(),
        **training_record(args, trainer, data, command=command, device=device, data_hash=data_hash, t0=t0),
    }
    (args.out / "model.json").write_text(json.dumps(model, indent=1))
    log.info("model written to %s in %.0f s", args.out, time.monotonic() - t0)
    out: Path = args.out
    return out


def run_cli(args: argparse.Namespace) -> int:
    """Entry point for `gatekeeper train detector` (argparse namespace from `add_arguments`)."""
    try:
        train_detector(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m models.detector.stylegan2.train ...` — the same command without the service CLI (GPU machines)."""
    parser = argparse.ArgumentParser(
        prog="python -m models.detector.stylegan2.train", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train_detector(args)
    except ValueError as exc:
        print(f"train detector: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
