"""`gatekeeper train detector --recipe patch`: the v2 detector — patches, several CT windows, local evidence.

What it changes relative to the slice recipe (`train.py`; docs/detector.md, "Diagnosis"):

* input: each slice resampled to `--spacing-mm` (1.5 mm) pixels in a `--field-mm` (480 mm) square
  centred on the body's bounding box, as three windows stacked as channels (abdomen W400/L50, liver
  W150/L70, metal (HU − 200)/2800), cut into 32² patches on a `--stride` (16 px) grid whose centre
  lies in the body (`service.imaging`);
* conditioning: (slice position, patch centre x, y in the body's bounding box) for G, D and E;
* score: per patch r + κ·f, a z-score against validation-normal patches at the same position bin ×
  location bin (fallback: position bin, then global); slice score = the largest patch z of the
  slice; series score = mean of the 3 highest slice scores among slices whose position lies within
  the training positions' range ± `--range-margin`.

Phases, each with its share of `--minutes` (or a fixed number of steps): `position` (body-part
regression, as in `train.py`, on the slice recipe's `--size`² images), `gan` (non-saturating
logistic loss, lazy R1 on reals, EMA of G), `encoder` (izi_f with G_ema and D frozen), then
calibration on the validation normals and export (`patch.export.export_patch_onnx`, model.json format 2).
One checkpoint dict (`checkpoint.pt`, with "recipe": "patch") every `--checkpoint-every` s and after
every phase; `--resume` continues it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.detector.data import Dataset, PatchSeriesData, cpu_count, load_dataset
from models.detector.metrics import threshold_at_false_flag_rate
from models.detector.onnx_graph import OPSET
from models.detector.patch.calibrate import (
    HELD_OUT,
    ValidationPatchScores,
    fit_table,
    held_out_series_scores,
    series_score_in_range,
)
from models.detector.patch.export import export_patch_onnx
from models.detector.patch.networks import LOCAL_SIGMA_PX, PATCH, PatchScorer, build_patch_networks
from models.detector.stylegan2 import losses
from models.detector.stylegan2.networks import BodyPartRegressor, DCDiscriminator, DCGenerator
from models.detector.stylegan2.train import (
    MM_PER_UNIT,
    Trainer,
    _Clock,
    check_args,
    training_record,
)
from service import imaging
from service.errors import UsageError

log = logging.getLogger(__name__)

#: Share of the time budget per phase; the remaining 15 % is calibration (every validation patch: ≈ 6–10
#: minutes for 10 long validation series on 2 cores) and export.
PHASE_SHARE = {"position": 0.05, "gan": 0.57, "encoder": 0.23}
#: model.json format of the patch recipe (the slice recipe's is 1; serving reads 1 only for now).
MODEL_FORMAT = 2
RECIPE = "patch"
#: Series aggregation: mean of this many highest in-range slice scores.
TOP_SLICES = 3
#: Network families of this recipe: dcgan = GAN, then izi_f encoder (f-AnoGAN, v2); aae = adversarial
#: autoencoder first (v3), then the same izi_f encoder phase.
PATCH_FAMILIES = ("dcgan", "aae")
#: Adversarial-autoencoder loss weights (GANomaly's order: the reconstruction dominates, the adversary
#: and the feature matching keep the reconstructions sharp and on the normals' manifold).
AAE_L1_WEIGHT = 20.0
AAE_ADV_WEIGHT = 1.0
#: Coarse noise of the AAE's inputs (Kascenas et al. 2022): drawn on a 4² grid per window, upsampled to
#: the patch, this standard deviation in the [-1, 1] window scale; the target is the clean patch, so the
#: autoencoder learns to put back normal tissue rather than to copy what it is shown.
AAE_NOISE_GRID = 4
AAE_NOISE_STD = 0.2


def coarse_noise(
    shape: torch.Size | tuple[int, ...],
    generator: torch.Generator,
    device: torch.device,
    *,
    std: float = AAE_NOISE_STD,
    grid: int = AAE_NOISE_GRID,
) -> torch.Tensor:
    """Smooth noise [N, C, H, W]: N(0, std²) on a `grid`² grid, bilinearly upsampled."""
    n, c, h, w = shape
    coarse = torch.randn(n, c, grid, grid, generator=generator) * std
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).to(device)


def geometry_from_args(args: argparse.Namespace) -> imaging.PatchGeometry:
    """The patch geometry the options ask for.

    Raises:
        ValueError: an impossible geometry (message names the field).
    """
    return imaging.PatchGeometry(
        spacing_mm=float(args.spacing_mm), field_mm=float(args.field_mm), patch=int(args.patch), stride=int(args.stride)
    )


def check_patch_args(args: argparse.Namespace) -> None:
    """`train.check_args` plus the patch recipe's own options.

    Raises:
        ValueError: naming the option.
    """
    check_args(args)
    if args.family not in PATCH_FAMILIES:
        raise ValueError(
            f"--recipe patch trains its own 32² DCGAN networks (--family dcgan or aae); --family {args.family} "
            "is for --recipe slice"
        )
    if args.patch != PATCH:
        raise ValueError(f"--patch must be {PATCH} (the networks' size), got {args.patch}")
    if not args.range_margin >= 0:
        raise ValueError(f"--range-margin must be >= 0, got {args.range_margin}")
    if not args.aae_noise_hu >= 0:
        raise ValueError(f"--aae-noise-hu must be >= 0, got {args.aae_noise_hu}")
    if not 1 <= args.aae_noise_grid <= PATCH:
        raise ValueError(f"--aae-noise-grid must be between 1 and {PATCH}, got {args.aae_noise_grid}")
    geometry_from_args(args)


@dataclass
class PatchTerms:
    """Raw per-patch outputs of one series: score r + κ·f [P], condition [P, 3], slice index [P],
    centres [P, 2] (row, column in the field)."""

    scores: np.ndarray
    cond: np.ndarray
    slice_index: np.ndarray
    centres: np.ndarray


def series_conditions(s: PatchSeriesData, positions: np.ndarray) -> np.ndarray:
    """[P, 3] condition of every body patch of `s` given its slice positions (`imaging.patch_conditions`)."""
    out = np.empty((s.centres.shape[0], 3), np.float32)
    for k in range(s.num_slices):
        sel = s.centres[:, 0] == k
        if sel.any():
            out[sel] = imaging.patch_conditions(float(positions[k]), s.centres[sel, 1:], s.boxes[k])
    return out


def gather_patches(fields: list[np.ndarray], rows: np.ndarray, patch: int) -> np.ndarray:
    """Window channels [B, C, patch, patch] of the patches `rows` [B, 4] = (series, slice, row, column)."""
    return imaging.window_channels(gather_hu(fields, rows, patch))


def gather_hu(fields: list[np.ndarray], rows: np.ndarray, patch: int) -> np.ndarray:
    """HU [B, patch, patch] of the patches `rows` [B, 4] = (series, slice, row, column)."""
    h = patch // 2
    hu = np.empty((rows.shape[0], patch, patch), np.float32)
    for b, (si, k, r, c) in enumerate(rows):
        hu[b] = fields[si][k, r - h : r + h, c - h : c + h]
    return hu


class PatchTrainer(Trainer):
    """The slice trainer's checkpoint, clock, progress and body-part regression, with patch networks and loops."""

    def __init__(self, args: argparse.Namespace, data: Dataset, device: torch.device) -> None:
        # Trainer.__init__ builds the slice networks; the attributes below are the same set, so the
        # inherited state/save/load/_bar/_log_progress/positions/train_position work unchanged.
        self.args, self.data, self.device = args, data, device
        self.geometry = geometry_from_args(args)
        self.channels = len(imaging.PATCH_WINDOWS)
        torch.manual_seed(args.seed)
        nets = build_patch_networks(self.channels, conditioned=not args.unconditioned)
        self.G, self.D, self.E = nets.G.to(device), nets.D.to(device), nets.E.to(device)
        self.G_ema = copy.deepcopy(self.G).eval()
        use_bpr = args.position == "bpr" and not args.unconditioned
        self.P = BodyPartRegressor(args.size).to(device) if use_bpr else None
        self.diverged = False
        self.r1_every = 16
        lr, betas = 0.0002, (0.5, 0.999)
        c = self.r1_every / (self.r1_every + 1)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=lr, betas=betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=lr * c, betas=(betas[0] ** c, betas[1] ** c))
        self.opt_E = torch.optim.Adam(self.E.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_P = torch.optim.Adam(self.P.parameters(), lr=1e-3) if self.P is not None else None
        self.r1_gamma = 0.1
        self.steps = {phase: 0 for phase in PHASE_SHARE}
        self.history: dict[str, list[list[float]]] = {phase: [] for phase in PHASE_SHARE}
        self.done: list[str] = []
        self.position_norm = {"lo": 0.0, "hi": 1.0}
        self.clock = _Clock({})
        self.rng = torch.Generator(device="cpu").manual_seed(args.seed)
        self.train_series: list[PatchSeriesData] = [_patch_series(s) for s in data.train]

    def state(self) -> dict[str, Any]:
        return {**super().state(), "recipe": RECIPE, "format": MODEL_FORMAT}

    def load(self, state: dict[str, Any]) -> None:
        """Continue a checkpoint of this recipe.

        Raises:
            ValueError: the checkpoint is the slice recipe's.
        """
        if state.get("recipe") != RECIPE:
            raise ValueError("--resume: checkpoint.pt is not a --recipe patch checkpoint; use its own --recipe")
        super().load(state)

    def _budget(self, phase: str) -> float:
        return float(self.args.minutes * 60.0 * PHASE_SHARE[phase])

    # --- patches --------------------------------------------------------------------------------------
    def patch_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Every training body patch as (series, slice, row, column) [N, 4] and its condition [N, 3]."""
        rows, conds = [], []
        for i, s in enumerate(self.train_series):
            rows.append(np.concatenate([np.full((s.centres.shape[0], 1), i, np.int32), s.centres], axis=1))
            conds.append(series_conditions(s, self.positions(s)))
        index, cond = np.concatenate(rows), np.concatenate(conds)
        if index.shape[0] < self.args.batch:
            raise ValueError(f"--data: only {index.shape[0]} body patches in the training series; need >= --batch")
        return index, cond

    def _sample(self, index: np.ndarray, cond: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(index.shape[0], (self.args.batch,), generator=self.rng).numpy()
        x = gather_patches([s.hu_field for s in self.train_series], index[pick], self.geometry.patch)
        return torch.from_numpy(x).to(self.device), torch.from_numpy(cond[pick]).to(self.device)

    def _sample_noised(self, index: np.ndarray, cond: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clean patches, coarse-noised patches, condition) for the AAE. `--aae-noise-hu` 0: the noise is
        added to each window channel (std `AAE_NOISE_STD` in [-1, 1] units, v3); > 0: to the HU before
        windowing, one field for all channels — a blob darker or brighter in HU, as a lesion is."""
        pick = torch.randint(index.shape[0], (self.args.batch,), generator=self.rng).numpy()
        hu = gather_hu([s.hu_field for s in self.train_series], index[pick], self.geometry.patch)
        real = torch.from_numpy(imaging.window_channels(hu)).to(self.device)
        grid = int(self.args.aae_noise_grid)
        if self.args.aae_noise_hu > 0:
            noise = coarse_noise((hu.shape[0], 1, *hu.shape[1:]), self.rng, torch.device("cpu"), std=1.0, grid=grid)
            noised_hu = hu + float(self.args.aae_noise_hu) * noise[:, 0].numpy()
            noisy = torch.from_numpy(imaging.window_channels(noised_hu)).to(self.device)
        else:
            noisy = real + coarse_noise(real.shape, self.rng, self.device, grid=grid)
        return real, noisy, torch.from_numpy(cond[pick]).to(self.device)

    def _cond_only(self, cond: np.ndarray) -> torch.Tensor:
        pick = torch.randint(cond.shape[0], (self.args.batch,), generator=self.rng).numpy()
        return torch.from_numpy(cond[pick]).to(self.device)

    # --- GAN ------------------------------------------------------------------------------------------
    def _discriminator_step(
        self, real: torch.Tensor, fake: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One logistic D update on real against `fake` (detached), with the lazy R1 penalty every
        `r1_every` steps of the GAN phase; returns (d_loss, r1) (r1 = 0 on the other steps)."""
        d_loss = losses.d_logistic_loss(self.D(real, c), self.D(fake, c))
        self.opt_D.zero_grad(set_to_none=True)
        d_loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
        self.opt_D.step()
        r1 = torch.zeros(())
        if self.steps["gan"] % self.r1_every == 0:
            real_r1 = real.detach().requires_grad_(True)
            r1 = losses.r1_penalty(self.D(real_r1, c), real_r1)
            self.opt_D.zero_grad(set_to_none=True)
            (self.r1_gamma / 2 * r1 * self.r1_every).backward()
            self.opt_D.step()
        return d_loss, r1

    def train_patch_gan(self, index: np.ndarray, cond: np.ndarray) -> None:
        B, zdim = self.args.batch, self.G.z_dim
        self.G.train()
        self.D.train()
        bar, last = self._bar("gan"), [time.monotonic(), time.monotonic()]
        self.clock.start("gan")
        while self._running("gan"):
            real, c = self._sample(index, cond)
            with torch.no_grad():
                fake = self.G(torch.randn(B, zdim, device=self.device), c)
            d_loss, r1 = self._discriminator_step(real, fake, c)
            c = self._cond_only(cond)
            fake = self.G(torch.randn(B, zdim, device=self.device), c)
            for q in self.D.parameters():
                q.requires_grad_(False)
            g_loss = losses.g_nonsaturating_loss(self.D(fake, c))
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
                    log.error("gan: non-finite loss at step %d; stopping the GAN phase", self.steps["gan"])
                    break
            bar.update(1)
            self._log_progress("gan", {"d": d_loss.detach(), "g": g_loss.detach(), "r1": r1.detach()}, last)
        self.clock.stop()
        bar.close()
        log.info("gan: %d steps in %.0f s", self.steps["gan"], self.clock.elapsed["gan"])

    # --- adversarial autoencoder (--family aae) ----------------------------------------------------------
    def train_patch_aae(self, index: np.ndarray, cond: np.ndarray) -> None:
        """E and G trained together on the GAN phase's budget: x̃ = x + coarse noise, x̂ = G(E(x̃)),
        loss = 20·|x − x̂|₁ + non-saturating adversarial + κ·|D.f(x) − D.f(x̂)|²; D sees x against x̂ (R1)."""
        self.G.train()
        self.D.train()
        self.E.train()
        bar, last = self._bar("gan"), [time.monotonic(), time.monotonic()]
        self.clock.start("gan")
        while self._running("gan"):
            real, noisy, c = self._sample_noised(index, cond)
            recon = self.G(self.E(noisy, c), c)
            d_loss, r1 = self._discriminator_step(real, recon.detach(), c)
            for q in self.D.parameters():
                q.requires_grad_(False)
            adv = losses.g_nonsaturating_loss(self.D(recon, c))
            match = F.mse_loss(self.D.features(recon), self.D.features(real))
            for q in self.D.parameters():
                q.requires_grad_(True)
            l1 = (recon - real).abs().mean()
            loss = AAE_L1_WEIGHT * l1 + AAE_ADV_WEIGHT * adv + self.args.kappa * match
            self.opt_G.zero_grad(set_to_none=True)
            self.opt_E.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_G.step()
            self.opt_E.step()
            self.steps["gan"] += 1
            self._ema(self.steps["gan"] * self.args.batch)
            if self.steps["gan"] % 10 == 1:
                self.history["gan"].append([self.steps["gan"], d_loss.item(), adv.item(), r1.item(), l1.item()])
                if not all(math.isfinite(v) for v in self.history["gan"][-1][1:]):
                    self.diverged = True
                    log.error("aae: non-finite loss at step %d; stopping the AAE phase", self.steps["gan"])
                    break
            bar.update(1)
            self._log_progress("gan", {"d": d_loss.detach(), "g": adv.detach(), "l1": l1.detach()}, last)
        self.clock.stop()
        bar.close()
        log.info("aae: %d steps in %.0f s", self.steps["gan"], self.clock.elapsed["gan"])

    # --- encoder (izi_f) ------------------------------------------------------------------------------
    def train_patch_encoder(self, index: np.ndarray, cond: np.ndarray) -> None:
        G, D = self.G_ema.eval(), self.D.eval()
        for q in list(G.parameters()) + list(D.parameters()):
            q.requires_grad_(False)
        self.E.train()
        bar, last = self._bar("encoder"), [time.monotonic(), time.monotonic()]
        self.clock.start("encoder")
        while self._running("encoder"):
            x, c = self._sample(index, cond)
            recon = G(self.E(x, c), c)
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
        index, cond = self.patch_index()
        log.info("patches: %d training body patches of %d px", index.shape[0], self.geometry.patch)
        if self.args.family == "aae":
            self.train_patch_aae(index, cond)
        else:
            self.train_patch_gan(index, cond)
        self._mark_done("gan")
        self.train_patch_encoder(index, cond)
        self._mark_done("encoder")

    def patch_scorer(self) -> PatchScorer:  # the slice recipe's scorer() does not apply
        G = copy.deepcopy(self.G_ema).eval()
        E, D = copy.deepcopy(self.E).eval(), copy.deepcopy(self.D).eval()
        assert isinstance(G, DCGenerator) and isinstance(D, DCDiscriminator)  # built by build_patch_networks
        score = getattr(self.args, "patch_score", "mean")
        sigma = float(getattr(self.args, "local_sigma", LOCAL_SIGMA_PX))
        return PatchScorer(G, E, D, kappa=self.args.kappa, score=score, sigma=sigma).to(self.device)


def _patch_series(s: Any) -> PatchSeriesData:
    if not isinstance(s, PatchSeriesData):
        raise TypeError(f"series {s.series_instance_uid}: expected PatchSeriesData (load_dataset(..., patch=...))")
    return s


@torch.no_grad()
def patch_terms(
    scorer: PatchScorer, s: PatchSeriesData, positions: np.ndarray, device: torch.device, *, batch: int = 512
) -> PatchTerms:
    """Raw scores of every body patch of `s` (the scorer in eval mode), with their conditions and places."""
    cond = series_conditions(s, positions)
    fields = [s.hu_field]
    rows = np.concatenate([np.zeros((s.centres.shape[0], 1), np.int32), s.centres], axis=1)
    out = []
    scorer.eval()
    for i in range(0, rows.shape[0], batch):
        x = torch.from_numpy(gather_patches(fields, rows[i : i + batch], PATCH)).to(device)
        c = torch.from_numpy(cond[i : i + batch]).to(device)
        out.append(scorer(x, c)[0].float().cpu().numpy())
    scores = np.concatenate(out) if out else np.zeros(0, np.float32)
    return PatchTerms(scores, cond, s.centres[:, 0].copy(), s.centres[:, 1:].copy())


@dataclass
class PatchCalibration:
    normalisation: dict[str, Any]
    position_range: tuple[float, float]  # training positions' (min, max)
    margin: float
    threshold: float
    false_flag_rate: float
    validation_series_scores: list[float]
    validation_series_scores_held_out: list[float]
    validation_in_range_slices: list[int]

    def as_dict(self) -> dict[str, Any]:
        lo, hi = self.position_range
        return {
            "normalisation": {
                "kind": "patch z-score per (position bin x location bin); fallback position bin, then global",
                "function": "service.imaging.patch_z_scores",
                **self.normalisation,
            },
            "slice_score": "max of the slice's patch z-scores (service.imaging.slice_scores_from_patches)",
            "aggregation": f"top{TOP_SLICES}_mean",
            "aggregation_function": "service.imaging.series_score_in_range",
            "position_range": {
                "training_min": lo,
                "training_max": hi,
                "margin": self.margin,
                "low": lo - self.margin,
                "high": hi + self.margin,
                "note": "only slices whose position lies within [low, high] count for the series score: "
                "outside it the normals never showed the model that anatomy (a series with none inside "
                "is scored over all its slices)",
            },
            "threshold": self.threshold,
            "threshold_from": HELD_OUT,
            "target_false_flag_rate": self.false_flag_rate,
            "validation_series_scores": self.validation_series_scores,
            "validation_series_scores_held_out": self.validation_series_scores_held_out,
            "validation_in_range_slices": self.validation_in_range_slices,
        }


def calibrate_patch(
    trainer: PatchTrainer, scorer: PatchScorer, validation: list[PatchSeriesData], device: torch.device
) -> PatchCalibration:
    """Normalisation table, in-range series scores and threshold, on the validation normals only."""
    args = trainer.args
    train_pos = np.concatenate([trainer.positions(s) for s in trainer.train_series])
    lo, hi = float(train_pos.min()), float(train_pos.max())
    positions = [trainer.positions(s) for s in validation]
    terms = [patch_terms(scorer, s, p, device) for s, p in zip(validation, positions)]
    low, high = lo - args.range_margin, hi + args.range_margin
    scored = [ValidationPatchScores(t.scores, t.cond, t.slice_index, p) for p, t in zip(positions, terms)]
    table = fit_table(scored)
    series_scores, in_range = [], []
    for v in scored:
        score, n_in = series_score_in_range(v, table, low, high, TOP_SLICES)
        series_scores.append(round(score, 5))
        in_range.append(n_in)
    held_out = held_out_series_scores(scored, low, high, TOP_SLICES)
    threshold = threshold_at_false_flag_rate(np.array(held_out), args.false_flag_rate)
    log.info(
        "calibration: %d validation patches, position range [%.3f, %.3f] ± %.3f, threshold %.4g (held out)",
        sum(t.scores.size for t in terms),
        lo,
        hi,
        args.range_margin,
        threshold,
    )
    return PatchCalibration(
        table,
        (lo, hi),
        float(args.range_margin),
        threshold,
        float(args.false_flag_rate),
        series_scores,
        held_out,
        in_range,
    )


def train_patch_detector(args: argparse.Namespace) -> Path:
    """Run every phase of the patch recipe, calibrate, export; return the model folder.

    Raises:
        ValueError: impossible arguments or unusable data (message names the option or series).
    """
    check_patch_args(args)
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


def _preprocessing(geometry: imaging.PatchGeometry, position_size: int) -> dict[str, Any]:
    """model.json's `preprocessing`: how serving must cut, window and condition the patches
    (`service.imaging.preprocess_patch_series`), and the body-part regression's input."""
    return {
        "function": "service.imaging.preprocess_patch_series",
        "spacing_mm": geometry.spacing_mm,
        "field_mm": geometry.field_mm,
        "field_px": geometry.field_px,
        "centring": "centre of the body mask's bounding box (native resolution)",
        "patch": geometry.patch,
        "stride": geometry.stride,
        "patch_centres": "service.imaging.patch_centres (centre pixel inside the body mask)",
        "cond": "service.imaging.patch_conditions (position, x, y in the body's box; clipped to [0, 1])",
        "windows": [{"name": name, "center_hu": w.center, "width_hu": w.width} for name, w in imaging.PATCH_WINDOWS],
        "scale": "windowed [0,1] * 2 - 1 per channel (service.imaging.window_channels)",
        "body_threshold_hu": imaging.BODY_THRESHOLD_HU,
        "air_hu_outside_image": imaging.AIR_HU,
        "training_storage": "HU fields rounded to int16",
        "position_input": {
            "function": "service.imaging.preprocess_slices",
            "size": position_size,
            "window_center_hu": imaging.ABDOMEN_WINDOW.center,
            "window_width_hu": imaging.ABDOMEN_WINDOW.width,
        },
    }


def _train(args: argparse.Namespace) -> Path:
    t0 = time.monotonic()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    log.info("train detector (patch recipe): %s", _command(args))
    geometry = geometry_from_args(args)
    data = load_dataset(
        args.data,
        args.size,
        jobs=args.jobs or cpu_count(),
        seed=args.seed,
        max_series=args.max_series,
        patch=geometry,
    )
    data_hash = data.data_hash()
    log.info("data loaded in %.1f s, hash %s", time.monotonic() - t0, data_hash[:16])
    trainer = PatchTrainer(args, data, device)
    ckpt = args.out / "checkpoint.pt"
    if args.resume and ckpt.exists():
        trainer.load(torch.load(ckpt, map_location=device, weights_only=False))
        log.info("resumed from %s: steps %s, done %s", ckpt, trainer.steps, trainer.done)
    trainer.run()

    validation = [_patch_series(s) for s in data.validation]
    scorer = trainer.patch_scorer()
    calibration = calibrate_patch(trainer, scorer, validation, device)
    paths = export_patch_onnx(scorer, trainer.P, trainer.channels, trainer.G.z_dim, args.size, args.out)
    torch.save(
        {
            "recipe": RECIPE,
            "G_ema": trainer.G_ema.state_dict(),
            "E": trainer.E.state_dict(),
            "D": trainer.D.state_dict(),
            "P": trainer.P.state_dict() if trainer.P is not None else None,
            "normalisation": calibration.normalisation,
            "args": trainer.state()["args"],
        },
        args.out / "weights.pt",
    )
    model = {
        "format": MODEL_FORMAT,
        "recipe": RECIPE,
        "kind": "ct-patch-anomaly-detector",
        "family": args.family,
        "patch_score": scorer.score,
        "local_sigma_px": scorer.sigma if scorer.score == "local" else None,
        "aae_noise": (
            {
                "hu_std": args.aae_noise_hu,
                "grid": args.aae_noise_grid,
                "window_std": None if args.aae_noise_hu > 0 else AAE_NOISE_STD,
            }
            if args.family == "aae"
            else None
        ),
        "conditioned": not args.unconditioned,
        "patch": geometry.patch,
        "channels": trainer.channels,
        "z_dim": trainer.G.z_dim,
        "kappa": args.kappa,
        "cond": ["position", "x", "y"],
        "preprocessing": _preprocessing(geometry, args.size),
        "position": {
            "method": "naive" if args.unconditioned else args.position,
            "mm_per_unit": MM_PER_UNIT,
            **trainer.position_norm,
        },
        "files": {p.stem: p.name for p in paths},
        "onnx_opset": OPSET,
        **calibration.as_dict(),
        **training_record(
            args,
            trainer,
            data,
            command=_command(args),
            device=device,
            data_hash=data_hash,
            t0=t0,
            max_series=args.max_series,
            train_patches=int(sum(s.centres.shape[0] for s in trainer.train_series)),
        ),
    }
    (args.out / "model.json").write_text(json.dumps(model, indent=1))
    log.info("model written to %s in %.0f s", args.out, time.monotonic() - t0)
    out: Path = args.out
    return out


def _command(args: argparse.Namespace) -> str:
    return "gatekeeper train detector " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in vars(args).items()
        if k not in ("func", "command", "what", "verbose") and v not in (None, False)
    )


def run_cli(args: argparse.Namespace) -> int:
    """Entry point for `gatekeeper train detector --recipe patch` (argparse namespace from `add_arguments`)."""
    try:
        train_patch_detector(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0
