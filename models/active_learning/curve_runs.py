"""The selections and fine-tunes of the label-efficiency experiment (`curve.py`), each cached on disk."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from models.active_learning import curve_pool
from service.suggest import Candidate, rank

log = logging.getLogger(__name__)


def runs_of(strategies: tuple[str, ...], budgets: tuple[int, ...], repeats: int) -> list[tuple[str, int, int]]:
    """(strategy, seed, K) of every fine-tune: random once per seed, the others once."""
    return [(s, r, k) for s in strategies for r in range(repeats if s == "random" else 1) for k in budgets]


def run_name(strategy: str, seed: int, budget: int) -> str:
    return f"{strategy}-r{seed}-k{budget:03d}" if strategy == "random" else f"{strategy}-k{budget:03d}"


def candidates_of(pool: list[dict[str, Any]]) -> list[Candidate]:
    return [
        Candidate(
            series_instance_uid=p["name"],
            detector_score=p.get("detector_score"),
            detector_threshold=p.get("detector_threshold"),
            gate_fused=p.get("gate_fused"),
            gate_fused_threshold=p.get("gate_fused_threshold"),
            entropy=p.get("entropy"),
            embedding=np.asarray(p["embedding"], float) if p.get("embedding") is not None else None,
        )
        for p in pool
    ]


def select(pool: list[dict[str, Any]], *, strategy: str, budget: int, seed: int) -> list[str]:
    """The names of the `budget` pool series `strategy` ranks first (`service.suggest.rank`)."""
    return [s.series_instance_uid for s in rank(candidates_of(pool), strategy=strategy, budget=budget, seed=seed)]


def fine_tune_all(
    *,
    args: argparse.Namespace,
    opts: dict[str, Any],
    runs: list[tuple[str, int, int]],
    out: Path,
    model_dirs: dict[str, str],
    pool: list[dict[str, Any]],
    test: list[dict[str, Any]],
    replay: list[curve_pool.PlannedSeries],
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Every run's result (cached ones read back) by run name, and the shipped segmenter's Dice per test series."""
    import torch

    from models.active_learning.curve_train import baseline, run_one
    from models.segmenter.data import SegSeries

    torch.manual_seed(0)
    series = out / "series"

    def seg(folder: str, name: str) -> SegSeries:
        volume, liver = curve_pool.load_arrays(series / folder, name)
        return SegSeries(name, volume, liver)

    test_series = [seg("test", t["name"]) for t in test]
    replay_series = [seg("replay", r.name) for r in replay]
    validation = replay_series[: curve_pool.REPLAY_VALIDATION]
    shipped_path = out / "runs" / "shipped.json"
    if shipped_path.is_file():
        shipped = json.loads(shipped_path.read_text())
    else:
        shipped = baseline(parent=Path(model_dirs["segmenter"]), test=test_series)
        shipped_path.parent.mkdir(parents=True, exist_ok=True)
        shipped_path.write_text(json.dumps(shipped, indent=1) + "\n")
    results: dict[str, dict[str, Any]] = {}
    for n, (strategy, seed, budget) in enumerate(runs, 1):
        name = run_name(strategy, seed, budget)
        folder = out / "runs" / name
        if (folder / "result.json").is_file():
            results[name] = json.loads((folder / "result.json").read_text())
            log.info("run %d / %d %s: cached", n, len(runs), name)
            continue
        chosen = select(pool, strategy=strategy, budget=budget, seed=seed)
        log.info("run %d / %d %s: fine-tuning on %s", n, len(runs), name, ", ".join(chosen))
        results[name] = run_one(
            parent=Path(model_dirs["segmenter"]),
            chosen=[seg("pool", c) for c in chosen],
            replay=replay_series,
            validation=validation,
            test=test_series,
            out=folder,
            steps=opts["steps"],
            lr=args.lr,
            batch=args.batch,
            seed=seed,
            keep_model=args.keep_models,
        )
        log.info("run %s done in %.0f s", name, results[name]["seconds"])
    return results, shipped
