"""Helpers for the detector tests: an untrained exported detector and small labelled phantom runs.

An untrained detector (fresh weights, exported like a trained one, naive positions) exercises every
code path of scoring, evaluation and benchmarking in seconds; its scores mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from service import imaging

SIZE = 64


def untrained_detector(
    out: Path,
    *,
    family: str = "dcgan",
    size: int = SIZE,
    conditioned: bool = True,
    threshold: float = 0.0,
    seed: int = 0,
) -> Path:
    """Export a detector with fresh weights to `out` (scorer.onnx … + a minimal model.json); return `out`."""
    import torch

    from models.detector.stylegan2.export import export_onnx
    from models.detector.stylegan2.networks import Scorer, build_networks

    torch.manual_seed(seed)
    nets = build_networks(family, size, conditioned=conditioned)
    nets.G.noise_mode = "const"
    scorer = Scorer(nets.G, nets.E, nets.D, kappa=1.0).eval()
    paths = export_onnx(scorer, None, size, nets.G.z_dim, out)
    meta = {
        "format": 1,
        "kind": "ct-slice-anomaly-detector",
        "family": family,
        "conditioned": conditioned,
        "size": size,
        "z_dim": nets.G.z_dim,
        "kappa": 1.0,
        "preprocessing": {
            "function": "service.imaging.preprocess_slices",
            "window_center_hu": imaging.ABDOMEN_WINDOW.center,
            "window_width_hu": imaging.ABDOMEN_WINDOW.width,
        },
        "position": {"method": "naive"},
        "files": {p.stem: p.name for p in paths},
        "aggregation": "top3_mean",
        "threshold": threshold,
        "training": {"command": "untrained (test)"},
    }
    (out / "model.json").write_text(json.dumps(meta, indent=1))
    return out


def labelled_run(
    out: Path,
    *,
    train: int = 3,
    validation: int = 2,
    test_normal: int = 2,
    test_anomalies: tuple[str, ...] = ("tumor", "stent"),
    slices: int = 10,
    matrix: int = 64,
    seed: int = 40,
) -> dict:
    """A small phantom run with train/validation/test splits (manifest.json); returns the manifest."""
    from service.phantom.generate import SeriesSpec, generate_run

    specs = []
    plan = (
        [("train", None)] * train
        + [("validation", None)] * validation
        + [("test", None)] * test_normal
        + [("test", a) for a in test_anomalies]
    )
    for i, (split, anomaly) in enumerate(plan):
        specs.append(
            SeriesSpec(
                folder=f"{split}/{i:04d}_{anomaly or 'normal'}",
                patient_seed=seed + i,
                series_seed=seed + 100 + i,
                anomaly=anomaly,
                num_slices=slices,
                matrix=matrix,
                split=split,
            )
        )
    return generate_run(specs, out, jobs=1, progress=False, meta={"seed": seed, "protocol": "test"})
