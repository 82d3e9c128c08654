"""`gatekeeper evaluate active-learning`: Dice on held-out failures against the number of manual contours.

    gatekeeper evaluate active-learning --out DIR [--pool-series 200] [--test-per-type 4]
        [--budgets 5,10,20,40] [--strategies gan,gate,entropy,diverse,random] [--random-repeats 3]
        [--matrix 256] [--steps 200] [--jobs N] [--quick]

1. Data (`curve_pool`): an unlabeled pool of the clinic-like mix, a held-out test set of every
   anomaly type and normals, a few replay normals; fixed seeds disjoint from every other phantom set.
   Rendered, scored once by the serving code (detector, shipped gate + segmenter, detector encoder)
   and cached under DIR/series/.
2. Selection: for each strategy of `service.suggest` and budget K, the K pool series it ranks first
   (random: `--random-repeats` seeds).
3. Fine-tune (`curve_train`): the shipped segmenter, `--steps` steps on the K series' ground-truth
   livers (half of each batch) and the replay normals; Dice per held-out series. Every run's result
   is cached in DIR/runs/<strategy>[-r<seed>]-k<K>/result.json: a stopped run continues.
4. Report: DIR/report.json (`random_max_budget`, per strategy `budgets` and `dice` — the mean Dice
   over the held-out *failures* (anomalous series) — and `labels_to_match_random`), per type and
   normals with bootstrap CIs, normals' difference to the shipped segmenter (paired bootstrap), and
   DIR/curve.png (Dice vs labels, one line per strategy).

The estimated wall time is printed before the work starts (measured render/score and step times).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.active_learning import curve_pool
from models.active_learning.curve_report import write_report
from models.active_learning.curve_runs import fine_tune_all, run_name, runs_of
from service.errors import UsageError
from service.phantom.anomalies import ANOMALY_TYPES
from service.suggest import STRATEGIES

log = logging.getLogger(__name__)

DEFAULT_BUDGETS = (5, 10, 20, 40)
QUICK = {"pool_series": 16, "test_per_type": 1, "budgets": (2, 4), "strategies": ("gan", "random"), "steps": 3}
QUICK_TYPES = ("tumor", "truncation")
#: Seconds per series to render and score it at matrix 256 in one of two processes on 2 cores (measured
#: 2026-12-07: 196 pool series in 73 min with --jobs 2; the estimate's prior).
SECONDS_PER_SERIES_256 = 45.0


def register(what: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `evaluate active-learning`."""
    p = what.add_parser(
        "active-learning",
        help="label efficiency: Dice on held-out failures against the number of manual contours, per strategy",
        description="Fine-tune the shipped segmenter on the K phantom series each `pool suggest` strategy picks "
        "from an unlabeled clinic-like pool, for several budgets K, and measure Dice on a held-out set.",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the cache, report.json and curve.png")
    p.add_argument("--pool-series", type=int, default=200, help="unlabeled pool size (default 200)")
    p.add_argument("--test-per-type", type=int, default=4, help="held-out series per anomaly type (default 4)")
    p.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)), help="labels K (default 5,10,20,40)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"default {','.join(STRATEGIES)}")
    p.add_argument("--random-repeats", type=int, default=3, help="seeds of the random strategy (default 3)")
    p.add_argument("--matrix", type=int, default=256, help="phantom rows and columns (default 256)")
    p.add_argument("--steps", type=int, default=200, help="fine-tune steps per run (default 200)")
    p.add_argument("--batch", type=int, default=8, help="slices per step (default 8)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--jobs", type=int, default=None, help="processes for rendering and scoring (default: all cores)")
    p.add_argument("--keep-models", action="store_true", help="keep every fine-tuned segmenter.onnx")
    p.add_argument("--quick", action="store_true", help="a tiny run (2 budgets, 2 strategies, tiny pool): a smoke test")
    p.set_defaults(func=run_cli)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The run's options, checked; --quick overrides the sizes."""
    try:
        budgets = tuple(sorted({int(b) for b in str(args.budgets).split(",") if b.strip()}))
    except ValueError:
        raise UsageError(f"--budgets {args.budgets!r}: expected comma-separated integers") from None
    strategies = tuple(s.strip() for s in str(args.strategies).split(",") if s.strip())
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise UsageError(f"--strategies: unknown {unknown[0] if unknown else '(none)'!r}; one of {STRATEGIES}")
    opts: dict[str, Any] = {
        "pool_series": args.pool_series,
        "test_per_type": args.test_per_type,
        "budgets": budgets,
        "strategies": strategies,
        "steps": args.steps,
        "slices": None,
        "types": None,
    }
    if args.quick:
        opts.update(QUICK, slices=8, types=QUICK_TYPES)
    if not opts["budgets"] or min(opts["budgets"]) < 1 or max(opts["budgets"]) > opts["pool_series"] // 2:
        raise UsageError("--budgets must be >= 1 and at most half of --pool-series")
    if opts["test_per_type"] < 1 or args.random_repeats < 1 or opts["steps"] < 1 or args.matrix < 32:
        raise UsageError("--test-per-type, --random-repeats and --steps must be >= 1, --matrix >= 32")
    return opts


def run_cli(args: argparse.Namespace) -> int:
    """Plan, estimate, materialise, select, fine-tune (cached), report. Exit 0."""
    opts = _options(args)
    jobs = max(1, args.jobs or 2)
    from service.settings import load_settings_or_exit

    settings = load_settings_or_exit()
    model_dirs = {
        "segmenter": str(settings.segmenter_model_dir),
        "detector": str(settings.detector_model_dir),
        "gate": str(settings.gate_model_dir),
    }
    types = opts["types"] or ANOMALY_TYPES
    try:
        pool_plan = curve_pool.plan_pool(opts["pool_series"], matrix=args.matrix, slices=opts["slices"])
    except ValueError as exc:
        raise UsageError(f"--pool-series: {exc}") from None
    test_plan = curve_pool.plan_test(opts["test_per_type"], matrix=args.matrix, slices=opts["slices"], types=types)
    replay_plan = curve_pool.plan_replay(matrix=args.matrix, slices=opts["slices"])
    runs = runs_of(opts["strategies"], opts["budgets"], args.random_repeats)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    done = sum((out / "runs" / run_name(*r) / "result.json").is_file() for r in runs)
    step_s = _estimate(
        args, opts, out, model_dirs, len(pool_plan) + len(test_plan) + len(replay_plan), runs, done, jobs
    )
    t0 = time.monotonic()
    series = out / "series"
    pool = curve_pool.materialise(pool_plan, out=series / "pool", model_dirs=model_dirs, jobs=jobs, with_scores=True)
    test = curve_pool.materialise(test_plan, out=series / "test", model_dirs=model_dirs, jobs=jobs, with_scores=False)
    curve_pool.materialise(replay_plan, out=series / "replay", model_dirs=model_dirs, jobs=jobs, with_scores=False)
    log.info("data ready in %.0f s; one step %.2f s", time.monotonic() - t0, step_s)
    results, shipped = fine_tune_all(
        args=args, opts=opts, runs=runs, out=out, model_dirs=model_dirs, pool=pool, test=test, replay=replay_plan
    )
    report = write_report(
        args=args,
        opts=opts,
        out=out,
        results=results,
        shipped=shipped,
        pool=pool,
        test=test,
        wall_s=time.monotonic() - t0,
    )
    print(
        f"report written to {out / 'report.json'} and {out / 'curve.png'}; labels to match random at "
        f"K={report['random_max_budget']}: {json.dumps(report['labels_to_match_random'])}"
    )
    return 0


def _estimate(
    args: argparse.Namespace,
    opts: dict[str, Any],
    out: Path,
    model_dirs: dict[str, str],
    n_series: int,
    runs: list[tuple[str, int, int]],
    done: int,
    jobs: int,
) -> float:
    """Print the estimated wall time (a prior per series, a measured training step); return the step's seconds."""
    from models.active_learning.curve_train import time_one_step
    from models.segmenter.data import SegSeries

    rng = np.random.default_rng(0)
    fake = SegSeries("timing", rng.random((4, 128, 128)).astype(np.float16), np.ones((4, 128, 128), bool))
    step_s = time_one_step(parent=Path(model_dirs["segmenter"]), series=[fake], batch=args.batch)
    cached = len(list((out / "series").glob("*/*.json"))) if (out / "series").is_dir() else 0
    per_series = SECONDS_PER_SERIES_256 * (args.matrix / 256) ** 2 * (0.15 if opts["slices"] else 1.0)
    data_s = max(0, n_series - cached) * per_series / jobs
    test_slices = 100 * (len(opts["types"] or ()) or 7) * opts["test_per_type"] * 1.3
    eval_s = test_slices * step_s / args.batch / 3
    train_s = (len(runs) - done) * (opts["steps"] * step_s + eval_s + 5)
    print(
        f"estimated wall time: {(data_s + train_s + eval_s) / 60:.0f} min ({n_series - cached} series to render and "
        f"score ≈ {data_s / 60:.0f} min on {jobs} processes; {len(runs) - done} of {len(runs)} fine-tunes to run, "
        f"{opts['steps']} steps × {step_s:.2f} s + evaluation ≈ {train_s / 60:.0f} min)",
        flush=True,
    )
    return step_s
