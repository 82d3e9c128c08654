"""Segmenter Dice on held-out tumour / fluid / stent phantom series before and after one retrain from a pool.

    nice -n 10 .venv/bin/python ops/active_learning_dice.py [--out docs/evaluation/active-learning] [--work DIR]

What it does, end to end through the product's own commands, on a throwaway SQLite install under
`--work`:

1. base data: the first `--base-series` normal training series and 2 validation series of the seed
   protocol that trained the shipped segmenter (`gatekeeper phantom dataset`, seed 0), at
   `--slices` slices and `--matrix`²;
2. the pool: `--pool-per-type` tumour, fluid and stent series of other patients, their ground-truth
   liver standing in for the dosimetrists' returned contours;
3. the held-out set: `--heldout-per-type` normal, tumour, fluid and stent series of yet other
   patients (`models.active_learning.candidate.heldout_specs`);
4. `gatekeeper train segmenter --pool --pool-dir POOL --data BASE` (fine-tunes the active = shipped
   segmenter, registers a candidate), then `gatekeeper evaluate candidate segmenter VERSION --data
   HELDOUT` (both versions on the same series);
5. writes `dice_before_after.png`, `results.json` and `report.md` to `--out`.

Defaults keep it to about a quarter of an hour of CPU on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TYPES = ("normal", "tumor", "fluid", "stent")
POOL_SEED_BASE = 3_000_000


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def make_data(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    import numpy as np

    from models.active_learning.candidate import heldout_specs
    from service.phantom.generate import SeriesSpec, dataset_specs, generate_run

    protocol = dataset_specs(seed=0, large=False, num_slices=args.slices, matrix=args.matrix, noise_sigma=12.0)
    normal_train = [s for s in protocol if s.split == "train" and s.anomaly is None][: args.base_series]
    normal_validation = [s for s in protocol if s.split == "validation" and s.anomaly is None][:2]
    rng = np.random.default_rng([0, 0x9001])
    pool_types = [t for t in TYPES if t != "normal"]
    seeds = POOL_SEED_BASE + rng.choice(1_000_000, size=(len(pool_types) * args.pool_per_type, 2), replace=False)
    pool = [
        SeriesSpec(
            folder=f"{n:03d}_{kind}",
            patient_seed=int(seeds[n, 0]),
            series_seed=int(seeds[n, 1]),
            anomaly=kind,
            num_slices=args.slices,
            matrix=args.matrix,
        )
        for n, kind in enumerate(t for t in pool_types for _ in range(args.pool_per_type))
    ]
    heldout = heldout_specs(types=TYPES, per_type=args.heldout_per_type, slices=args.slices, matrix=args.matrix, seed=0)
    folders = {}
    for name, specs in (("base", normal_train + normal_validation), ("pool", pool), ("heldout", heldout)):
        folders[name] = work / name
        if not (folders[name] / "manifest.json").is_file():
            print(f"generating {name}: {len(specs)} series", flush=True)
            generate_run(specs, folders[name], jobs=args.jobs, progress=False)
    return folders


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = report["per_series"]
    kinds = [k for k in TYPES if any(r["anomaly"] == k for r in rows)]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    for x, kind in enumerate(kinds):
        sel = [r for r in rows if r["anomaly"] == kind]
        for r in sel:
            ax.plot([x - 0.15, x + 0.15], [r["active"], r["candidate"]], color="0.75", lw=0.8, zorder=1)
        ax.scatter([x - 0.15] * len(sel), [r["active"] for r in sel], color="tab:blue", s=18, zorder=2)
        ax.scatter([x + 0.15] * len(sel), [r["candidate"] for r in sel], color="tab:orange", s=18, zorder=2)
        for dx, key, colour in ((-0.15, "active", "tab:blue"), (0.15, "candidate", "tab:orange")):
            mean = float(np.mean([r[key] for r in sel]))
            ax.plot([x + dx - 0.1, x + dx + 0.1], [mean, mean], color=colour, lw=2.5, zorder=3)
    ax.set_xticks(range(len(kinds)), [f"{k}\n(n={sum(r['anomaly'] == k for r in rows)})" for k in kinds])
    ax.set_ylabel("3-D Dice vs ground-truth liver")
    ax.scatter([], [], color="tab:blue", label=f"before: active {report['active']}")
    ax.scatter([], [], color="tab:orange", label=f"after: candidate {report['candidate']}")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("Held-out phantom series, before and after one retrain from the pool", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "evaluation" / "active-learning")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gatekeeper-active-learning"))
    parser.add_argument("--base-series", type=int, default=8)
    parser.add_argument("--pool-per-type", type=int, default=7)
    parser.add_argument("--heldout-per-type", type=int, default=4)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="delete --work first (data included)")
    args = parser.parse_args(argv)

    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    # A throwaway install: its own SQLite database and storage, nothing else touched.
    for key in [k for k in os.environ if k.startswith("GATEKEEPER_")]:
        del os.environ[key]
    os.environ["GATEKEEPER_STORAGE_DIR"] = str(args.work / "var")
    from service.commands.main import main as gatekeeper

    t0, c0 = time.monotonic(), cpu_seconds()
    folders = make_data(args.work, args)
    t_data, c_data = time.monotonic() - t0, cpu_seconds() - c0
    assert gatekeeper(["db", "upgrade"]) == 0
    candidate_dir = args.work / "candidate"
    shutil.rmtree(candidate_dir, ignore_errors=True)
    train = [
        "train",
        "segmenter",
        "--pool",
        "--data",
        str(folders["base"]),
        "--pool-dir",
        str(folders["pool"]),
        "--out",
        str(candidate_dir),
        "--fine-tune-steps",
        str(args.steps),
        "--jobs",
        str(args.jobs),
        "--threads",
        str(args.threads),
        "--no-progress",
        "--by",
        "ops/active_learning_dice.py",
    ]
    t1, c1 = time.monotonic(), cpu_seconds()
    assert gatekeeper(train) == 0
    t_train, c_train = time.monotonic() - t1, cpu_seconds() - c1
    version = json.loads((candidate_dir / "model.json").read_text())["version"]
    evaluation = args.work / "evaluation"
    t2, c2 = time.monotonic(), cpu_seconds()
    rc = gatekeeper(
        ["evaluate", "candidate", "segmenter", version, "--data", str(folders["heldout"]), "--out", str(evaluation)]
    )
    t_eval, c_eval = time.monotonic() - t2, cpu_seconds() - c2
    report = json.loads((evaluation / "report.json").read_text())
    meta = json.loads((candidate_dir / "model.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    plot(report, args.out / "dice_before_after.png")
    results = {
        "command": "nice -n 10 .venv/bin/python ops/active_learning_dice.py " + " ".join(sys.argv[1:]),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_command": "gatekeeper " + " ".join(train),
        "evaluate_exit_code": rc,
        "report": report,
        "candidate_training": meta["training"],
        "candidate_validation_dice": meta["metrics"]["validation_dice_mean"],
        "wall_seconds": {"data": round(t_data), "train": round(t_train), "evaluate": round(t_eval)},
        "cpu_seconds": {"data": round(c_data), "train": round(c_train), "evaluate": round(c_eval)},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}",
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        "| type | n | Dice before (active) | Dice after (candidate) | change |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, row in report["per_type"].items():
        change = row["candidate_mean"] - row["active_mean"]
        lines.append(
            f"| {kind} | {row['n']} | {row['active_mean']:.4f} | {row['candidate_mean']:.4f} | {change:+.4f} |"
        )
    lines.append("")
    lines += [f"- {'pass' if c['passed'] else 'FAIL'} {c['name']}: {c['detail']}" for c in report["checks"]]
    lines.append(f"- verdict of `evaluate candidate`: {'safe' if report['safe'] else 'not safe'} to promote")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"wall_seconds": results["wall_seconds"], "cpu_seconds": results["cpu_seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
