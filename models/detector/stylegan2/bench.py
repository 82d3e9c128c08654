"""The slice recipe's part of the scoring benchmark (`gatekeeper bench score`, `python -m models.detector
bench`): its torch Scorer (from weights.pt, or the model.json architecture with fresh weights), random
slice inputs, and the steps of `service.inference.Detector` on a series. An item is a slice.
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
from models.detector.stylegan2.export import load_scorer
from models.detector.stylegan2.networks import Scorer, build_networks
from service import imaging
from service.dicom_series import CTSeries
from service.inference import Detector


def scorer_for_bench(model_dir: Path) -> tuple[Scorer, bool]:
    """The model's torch Scorer: from weights.pt when present, else the same architecture from model.json
    with fresh weights (seed 0). Returns (scorer in eval mode, True when the weights are fresh)."""
    if (model_dir / "weights.pt").is_file():
        return load_scorer(model_dir, torch.device("cpu")), False
    meta = json.loads((model_dir / "model.json").read_text())
    torch.manual_seed(0)
    nets = build_networks(
        meta["family"],
        int(meta["size"]),
        z_dim=int(meta.get("z_dim", 128)),
        conditioned=bool(meta.get("conditioned", True)),
    )
    nets.G.noise_mode = "const"
    scorer = Scorer(nets.G, nets.E, nets.D, kappa=float(meta.get("kappa", 1.0)))
    norm = meta.get("normalisation")
    if norm:
        scorer.set_position_normalisation(
            norm["position_grid"],
            [norm["mu_residual"], norm["sigma_residual"], norm["mu_feature"], norm["sigma_feature"]],
        )
    return scorer.eval(), True


def slice_feeds(size: int) -> Feeds:
    """Random inputs of the slice scorer for a batch: image, position, body mask (in call order)."""

    def make(b: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {
            "image": rng.uniform(-1, 1, (b, 1, size, size)).astype(np.float32),
            "position": rng.uniform(0, 1, b).astype(np.float32),
            "mask": (rng.uniform(size=(b, 1, size, size)) > 0.3).astype(np.float32),
        }

    return make


def gflop_per_slice(scorer: Scorer, size: int) -> float:
    """Conv and matmul GFLOP of one slice score of the slice recipe (see `gflop_per_item`)."""
    return gflop_per_item(scorer, slice_feeds(size))


def torch_and_onnx(
    model_dir: Path, meta: dict[str, Any], device: torch.device
) -> tuple[torch.nn.Module, Feeds, str, list[int]]:
    """For `python -m models.detector bench`: the torch scorer on `device`, its inputs, the served ONNX
    file's name and the default batch sizes."""
    return scorer_for_bench(model_dir)[0].to(device), slice_feeds(int(meta["size"])), "scorer.onnx", [16, 64]


def series_steps(detector: Detector, series: CTSeries, t_read: float) -> tuple[float, float, float, dict[str, Any]]:
    """`Detector`'s scoring of one series: preprocessing, then position and score (see `series_end_to_end`)."""
    images, masks = imaging.preprocess_slices(series.hu, detector.size, detector.window)
    t_pre, t_score = t_read, time.perf_counter()  # preprocessing, then position and score
    positions = detector.positions(images, series.locations_mm)
    scores, _ = detector.score_arrays(images, masks, positions)
    imaging.aggregate_slice_scores(scores, detector.aggregation)
    return t_pre, t_score, time.perf_counter(), {}


def open_detector(model_dir: Path) -> Detector:
    """The served detector on the ONNX Runtime CPU provider."""
    return Detector(model_dir, providers=["CPUExecutionProvider"])


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
    """`gatekeeper bench score` of a slice-recipe model: the items are slices."""
    size = int(meta["size"])
    scorer, fresh = scorer_for_bench(model_dir)
    result: dict[str, Any] = {
        "model": str(model_dir),
        "format": meta.get("format", 1),
        "item": "slice",
        "family": meta.get("family"),
        "size": size,
        "conditioned": meta.get("conditioned", True),
        "fresh_weights": fresh,
        "machine": machine(threads),
        "gflop_per_slice": round(gflop_per_slice(scorer, size), 3),
        "matmul_peak_gflops": round(matmul_peak(matmul_n, min(3.0, 2 * seconds)), 1),
        "matmul_n": matmul_n,
    }
    result["gflop_per_item"] = result["gflop_per_slice"]
    with tempfile.TemporaryDirectory(prefix="gk-bench-onnx-") as tmp:
        onnx_path = Path(tmp) / "scorer.onnx"
        x = torch.rand(2, 1, size, size) * 2 - 1
        export_graph(
            scorer,
            (x, torch.rand(2), torch.ones(2, 1, size, size)),
            onnx_path,
            ["image", "position", "mask"],
            ["score", "residual", "feature", "residual_map"],
        )
        rates, agreement = engine_rates(scorer, onnx_path, slice_feeds(size), batches, seconds, threads)
    result["rates"] = {b: {k: round(v, 2) for k, v in r.items()} for b, r in rates.items()}
    result["agreement"] = agreement
    result["series"] = series_end_to_end(model_dir, series_slices, matrix, open_detector, series_steps)
    return result
