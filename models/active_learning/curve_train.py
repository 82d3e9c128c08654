"""Fine-tuning and evaluation of the label-efficiency experiment (`curve.py`); torch.

One fine-tune: the shipped segmenter rebuilt in torch from its ONNX file
(`models.segmenter.onnx_weights.unet_from_onnx`), then `models.segmenter.train.fit_and_export`
(its loop, losses, augmentation and cosine schedule) for a fixed number of steps on batches drawn
half from the K chosen series' ground-truth livers (as a dosimetrist would draw them) and half from
the replay normals. Evaluation: per held-out series the 3-D Dice at the network's working
resolution after serving's post-processing (largest component of p > 0.5), as the training loop's
own validation measures it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.segmenter.data import SegDataset, SegSeries
from models.segmenter.network import UNet
from models.segmenter.onnx_weights import unet_from_onnx
from models.segmenter.train import Schedule, SliceSampler, augment, fit_and_export, predict_volume
from service.segmentation import dice, largest_component

log = logging.getLogger(__name__)


def evaluate(net: UNet, series: list[SegSeries], context: int) -> list[float]:
    """Dice per series (network resolution, serving's post-processing)."""
    device = torch.device("cpu")
    return [dice(largest_component(predict_volume(net, s.volume, context, device) > 0.5), s.liver) for s in series]


def _draw_factory(
    chosen: list[SegSeries], replay: list[SegSeries], context: int, seed: int
) -> Callable[[torch.Generator], Callable[[int], tuple[torch.Tensor, torch.Tensor]]]:
    """Batches half from the chosen series, half from the replay normals, both augmented as in training."""

    def factory(gen: torch.Generator) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng([seed, 0xF7])
        own = SliceSampler(chosen, rng) if any(s.liver.any() for s in chosen) else None
        base = SliceSampler(replay, rng)

        def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            half = n // 2 if own is not None else 0
            parts = [base.batch(n - half, context)] + ([own.batch(half, context)] if own is not None else [])
            x = torch.cat([p[0] for p in parts])
            y = torch.cat([p[1] for p in parts])
            return augment(x, y, gen)

        return draw

    return factory


def fine_tune(
    *,
    parent: Path,
    chosen: list[SegSeries],
    replay: list[SegSeries],
    validation: list[SegSeries],
    out: Path,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
) -> tuple[UNet, dict[str, Any]]:
    """The parent segmenter fine-tuned on `chosen` (+ replay); resumable from `out/checkpoint.pt`."""
    net, spec, _ = unet_from_onnx(parent)
    args = argparse.Namespace(
        seed=seed,
        out=out,
        resume=True,
        minutes=1e9,
        batch=batch,
        checkpoint_every=60.0,
        no_progress=True,
        data=out,
    )
    data = SegDataset(chosen + replay, validation, f"active-learning {out.name}")
    meta = fit_and_export(
        args,
        net=net,
        spec=spec,
        data=data,
        device=torch.device("cpu"),
        schedule=Schedule(steps=steps, lr=lr, val_every=steps),
        training_extra={"active_learning_run": out.name, "chosen": [s.series_instance_uid for s in chosen]},
        draw_factory=_draw_factory(chosen, replay, spec.context_slices, seed),
    )
    return net, meta


def run_one(
    *,
    parent: Path,
    chosen: list[SegSeries],
    replay: list[SegSeries],
    validation: list[SegSeries],
    test: list[SegSeries],
    out: Path,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    keep_model: bool,
) -> dict[str, Any]:
    """Fine-tune, evaluate on `test`, write `out/result.json` (the cache a resumed run reads); return it."""
    t0 = time.monotonic()
    net, meta = fine_tune(
        parent=parent,
        chosen=chosen,
        replay=replay,
        validation=validation,
        out=out,
        steps=steps,
        lr=lr,
        batch=batch,
        seed=seed,
    )
    scores = evaluate(net, test, int(meta["input"]["context_slices"]))
    result = {
        "chosen": [s.series_instance_uid for s in chosen],
        "dice": {s.series_instance_uid: round(float(d), 5) for s, d in zip(test, scores)},
        "steps": steps,
        "seconds": round(time.monotonic() - t0, 1),
        "segmenter_version": meta["version"],
    }
    if not keep_model:
        for name in ("checkpoint.pt", "weights.pt", "segmenter.onnx"):
            (out / name).unlink(missing_ok=True)
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out / "result.json")
    return result


def baseline(*, parent: Path, test: list[SegSeries]) -> dict[str, float]:
    """Dice per held-out series of the shipped segmenter itself (before any fine-tune)."""
    net, spec, _ = unet_from_onnx(parent)
    return {s.series_instance_uid: round(float(d), 5) for s, d in zip(test, evaluate(net, test, spec.context_slices))}


def time_one_step(*, parent: Path, series: list[SegSeries], batch: int) -> float:
    """Seconds of one training step (forward, backward, update) on this machine, for the cost estimate."""
    net, spec, _ = unet_from_onnx(parent)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    sampler = SliceSampler(series, np.random.default_rng(0))
    from models.segmenter.train import loss_fn

    elapsed = []
    for _ in range(3):
        x, y = sampler.batch(batch, spec.context_slices)
        t0 = time.monotonic()
        loss = loss_fn(net(x), y.long())
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
        opt.step()
        elapsed.append(time.monotonic() - t0)
    return float(np.median(elapsed))
