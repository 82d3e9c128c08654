"""The patch recipe's part of the scoring benchmark (`gatekeeper bench score`, `python -m models.detector
bench`): its torch PatchScorer (from weights.pt, or fresh weights of the model.json networks), random
patch inputs, and the steps of `service.inference.PatchDetector` on a series. An item is a 32²
multi-window patch (a slice is ≈ 100–200 body patches; the end-to-end series says how many).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.detector.bench_engine import (
    Feeds,
    engine_rates,
    gflop_per_item,
    machine,
    matmul_peak,
    series_end_to_end,
)
from models.detector.onnx_graph import export_graph
from models.detector.patch.networks import LOCAL_SIGMA_PX, PATCH, PatchScorer, build_patch_networks
from service import imaging
from service.dicom_series import CTSeries
from service.inference import PatchDetector


def patch_scorer_for_bench(model_dir: Path) -> tuple[PatchScorer, bool]:
    """A format-2 model's torch PatchScorer: G_ema, E, D from weights.pt when present, else the same
    networks from model.json (channels, condition) with fresh weights (seed 0). Returns (scorer in eval
    mode, True when the weights are fresh)."""
    meta = json.loads((model_dir / "model.json").read_text())
    channels = int(meta.get("channels", 3))
    conditioned = bool(meta.get("conditioned", True))
    fresh = not (model_dir / "weights.pt").is_file()
    if fresh:
        torch.manual_seed(0)
    nets = build_patch_networks(channels, conditioned=conditioned, z_dim=int(meta.get("z_dim", 64)))
    if not fresh:
        weights = torch.load(model_dir / "weights.pt", map_location="cpu", weights_only=False)
        nets.G.load_state_dict(weights["G_ema"])
        nets.E.load_state_dict(weights["E"])
        nets.D.load_state_dict(weights["D"])
    scorer = PatchScorer(
        nets.G,
        nets.E,
        nets.D,
        kappa=float(meta.get("kappa", 1.0)),
        score=str(meta.get("patch_score", "mean")),
        sigma=float(meta.get("local_sigma_px") or LOCAL_SIGMA_PX),
    )
    return scorer.eval(), fresh


def patch_feeds(channels: int) -> Feeds:
    """Random inputs of the patch scorer for a batch: patches [b, C, 32, 32], cond [b, 3] (in call order)."""

    def make(b: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {
            "patches": rng.uniform(-1, 1, (b, channels, PATCH, PATCH)).astype(np.float32),
            "cond": rng.uniform(0, 1, (b, 3)).astype(np.float32),
        }

    return make


def torch_and_onnx(
    model_dir: Path, meta: dict[str, Any], device: torch.device
) -> tuple[torch.nn.Module, Feeds, str, list[int]]:
    """For `python -m models.detector bench`: the torch scorer on `device`, its inputs, the served ONNX
    file's name and the default batch sizes (larger on a GPU)."""
    batches = [512, 4096] if device.type == "cuda" else [64, 512]
    scorer = patch_scorer_for_bench(model_dir)[0].to(device)
    return scorer, patch_feeds(int(meta.get("channels", 3))), str(meta["files"]["patch_scorer"]), batches


def series_steps(
    detector: PatchDetector, series: CTSeries, t_read: float
) -> tuple[float, float, float, dict[str, Any]]:
    """The steps of `PatchDetector.score_series`, timed one by one (see `series_end_to_end`)."""
    positions = detector.positions(series)
    t_pre = time.perf_counter()
    fields, masks, boxes = imaging.preprocess_patch_series(series.hu, series.pixel_spacing_mm, detector.geometry)
    t_score = time.perf_counter()
    z, slice_index, _ = detector.patch_z_scores(fields, masks, boxes, positions)
    slice_scores = imaging.slice_scores_from_patches(z, slice_index, series.num_slices)
    imaging.series_score_in_range(slice_scores, positions, detector.position_low, detector.position_high)
    t_end = time.perf_counter()
    extra = {
        "position_s": round(t_pre - t_read, 2),
        "patches": int(z.size),
        "patches_per_slice": round(z.size / series.num_slices, 1),
    }
    return t_pre, t_score, t_end, extra


def open_detector(model_dir: Path) -> PatchDetector:
    """The served patch detector on the ONNX Runtime CPU provider."""
    return PatchDetector(model_dir, providers=["CPUExecutionProvider"])


def bench_score(
    model_dir: Path,
    meta: dict[str, Any],
    *,
    batches: Sequence[int],
    seconds: float,
    series_slices: int,
    matrix: int,
    threads: int | None,
    matmul_n: int,
) -> dict[str, Any]:
    """`bench_score` of a format-2 (patch recipe) model: the items are patches."""
    scorer, fresh = patch_scorer_for_bench(model_dir)
    channels = int(meta.get("channels", 3))
    feeds = patch_feeds(channels)
    pre = meta["preprocessing"]
    result: dict[str, Any] = {
        "model": str(model_dir),
        "format": meta.get("format", 2),
        "item": "patch",
        "family": meta.get("family"),
        "recipe": "patch",
        "patch": PATCH,
        "channels": channels,
        "spacing_mm": pre.get("spacing_mm"),
        "stride": pre.get("stride"),
        "conditioned": meta.get("conditioned", True),
        "fresh_weights": fresh,
        "machine": machine(threads),
        "gflop_per_item": round(gflop_per_item(scorer, feeds), 5),
        "matmul_peak_gflops": round(matmul_peak(matmul_n, min(3.0, 2 * seconds)), 1),
        "matmul_n": matmul_n,
    }
    with tempfile.TemporaryDirectory(prefix="gk-bench-onnx-") as tmp:
        if fresh:
            onnx_path = Path(tmp) / "patch_scorer.onnx"
            sample = [torch.from_numpy(v) for v in feeds(2, np.random.default_rng(1)).values()]
            export_graph(
                scorer, tuple(sample), onnx_path, ["patches", "cond"], ["score", "residual", "feature", "residual_map"]
            )
            result["onnx"] = "exported here from the fresh weights"
        else:
            onnx_path = model_dir / meta["files"]["patch_scorer"]
            result["onnx"] = f"the model's {onnx_path.name} (the served graph)"
        rates, agreement = engine_rates(scorer, onnx_path, feeds, batches, seconds, threads)
    result["rates"] = {b: {k: round(v, 2) for k, v in r.items()} for b, r in rates.items()}
    result["agreement"] = agreement
    result["series"] = series_end_to_end(model_dir, series_slices, matrix, open_detector, series_steps)
    result["gflop_per_slice"] = round(result["gflop_per_item"] * result["series"]["patches_per_slice"], 3)
    return result
