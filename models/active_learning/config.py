"""Options of `gatekeeper evaluate candidate` (no torch here, so the CLI can list them cheaply)."""

from __future__ import annotations

import argparse
from pathlib import Path

#: Anomaly types a liver segmenter may learn from returned contours: the pool's kinds unless told otherwise.
DEFAULT_POOL_KINDS = ("tumor", "fluid", "stent")
#: Default tolerance per kind: mean Dice on normals (segmenter); share of normals flagged (detector).
DEFAULT_TOLERANCE = {"segmenter": 0.01, "detector": 0.05}


def add_candidate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", metavar="KIND", choices=("segmenter", "detector"), help="segmenter | detector")
    p.add_argument("version", metavar="VERSION", help="the candidate's version (`gatekeeper models list`)")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="held-out set: a phantom run folder (manifest.json names each series' anomaly type; liver from its "
        "ground truth). Default: a fixed phantom set generated once under storage_dir/evaluation/ (below)",
    )
    p.add_argument("--per-type", type=int, default=3, help="generated set: series per type (default 3)")
    p.add_argument("--slices", type=int, default=48, help="generated set: slices per series (default 48)")
    p.add_argument("--matrix", type=int, default=256, help="generated set: rows and columns (default 256)")
    p.add_argument(
        "--types",
        default=None,
        help="generated set: comma-separated types, 'normal' and anomaly types (default: normal and every type)",
    )
    p.add_argument("--seed", type=int, default=0, help="generated set: seed (default 0; patients unlike training's)")
    p.add_argument(
        "--pool-kinds",
        default=None,
        help="comma-separated anomaly types the candidate must do better on (default: the kinds its training "
        f"pool recorded, else {','.join(DEFAULT_POOL_KINDS)})",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest accepted regression on normals: mean Dice for a segmenter (default "
        f"{DEFAULT_TOLERANCE['segmenter']}), share of normals flagged for a detector (default "
        f"{DEFAULT_TOLERANCE['detector']})",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", type=Path, default=None, help="also write report.json (per series too) to this folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
