"""`gatekeeper train detector --pool`: retrain the detector with the pool's series counted as normal; a candidate.

    gatekeeper train detector --pool --data BASE --out DIR [--pool-dir POOL] [every `train detector` option]

The series the dosimetrists contoured are, once the segmenter has learnt them, series the gate
need not stop. The detector is trained again, by the recipe and options of `train detector`, on a
folder (`DIR/data`) that holds the base data's series and the pool's, with a `manifest.json`
whose splits count every pool series as a normal **training** series; the base data keeps its own
splits (its phantom manifest, or `train detector`'s seeded 10 % validation hold-out), so the
validation normals that set the threshold are the base data's only. The folder holds symbolic links
to the files, not copies. The result in `DIR` is registered as a candidate with its training data
(pool entry ids, the base data, the detector version it replaces when promoted).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from models.active_learning.pool import active_folder, find_pool, register_candidate
from models.detector.data import normal_splits, scan_parallel
from models.detector.family import train_detector
from service import dicom_series
from service.db.tables import ModelKind
from service.errors import UsageError
from service.settings import load_settings_or_exit

log = logging.getLogger(__name__)

#: Sub-folder of `--out` that holds the combined training folder (links and manifest.json).
DATA_FOLDER = "data"


def _link_tree(source: Path, target: Path) -> int:
    """Mirror every file under `source` as a symbolic link under `target`; return how many."""
    count = 0
    for dirpath, _, filenames in os.walk(source):
        folder = target / Path(dirpath).relative_to(source)
        folder.mkdir(parents=True, exist_ok=True)
        for name in filenames:
            if name == "manifest.json" and Path(dirpath) == source:
                continue  # the combined folder has its own
            os.symlink(Path(dirpath, name).resolve(), folder / name)
            count += 1
    return count


def combined_training_folder(*, base: Path, pool: Path, out: Path, seed: int, jobs: int) -> dict[str, Any]:
    """Make `out` a folder of the base data's and the pool's series with a manifest counting the pool as normal.

    Returns the manifest written (`series`: one entry per series with `split`; pool series also
    `"pool": true`).

    Raises:
        UsageError: the pool holds no CT series, or a pool series is also in the base data.
    """
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    base_groups = dicom_series.ct_series_in(scan_parallel(base, jobs))
    base_manifest: dict[str, Any] = {}
    try:
        base_manifest = json.loads((base / "manifest.json").read_text())
    except (OSError, ValueError):
        base_manifest = {}
    if isinstance(base_manifest, dict) and base_manifest.get("series"):
        entries = [dict(e) for e in base_manifest["series"] if isinstance(e, dict)]
    else:
        splits, _ = normal_splits(base, base_groups, seed)
        entries = [{"series_instance_uid": uid, "split": split, "anomaly": None} for uid, split in splits.items()]
    known = {e.get("series_instance_uid") for e in entries}
    pool_uids = [g.series_instance_uid for g in dicom_series.ct_series_in(scan_parallel(pool, jobs))]
    if not pool_uids:
        raise UsageError(f"the pool ({pool}) holds no CT series")
    clash = [uid for uid in pool_uids if uid in known]
    if clash:
        raise UsageError(f"pool series {clash[0]} is also in the base data {base}; train on one or the other")
    entries += [{"series_instance_uid": uid, "split": "train", "anomaly": None, "pool": True} for uid in pool_uids]
    links = _link_tree(base, out / "base") + _link_tree(pool, out / "pool")
    manifest = {
        "description": "base data plus the training pool, the pool's series counted as normal training series",
        "base": str(base.resolve()),
        "pool": str(pool.resolve()),
        "series": entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log.info("training folder %s: %d base + %d pool series (%d file links)", out, len(known), len(pool_uids), links)
    return manifest


def base_series_hash(manifest: dict[str, Any]) -> str:
    """SHA-256 over the base data's series UIDs and splits (which series the detector saw, and as what)."""
    base = sorted(
        (str(e.get("series_instance_uid")), str(e.get("split"))) for e in manifest["series"] if not e.get("pool")
    )
    return hashlib.sha256(json.dumps(base).encode()).hexdigest()


def run_cli(args: argparse.Namespace) -> int:
    """Build the combined folder, train by `train detector`'s recipe, register the candidate. Exit 0."""
    from models.detector.data import cpu_count
    from service.db.schema import open_database

    if not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: no such folder")
    settings = load_settings_or_exit()
    t0 = time.monotonic()
    with open_database(settings) as sessions:
        parent, _ = active_folder(sessions=sessions, settings=settings, kind=ModelKind.DETECTOR)
        pool = find_pool(args=args, sessions=sessions, settings=settings)
        folder = Path(args.out) / DATA_FOLDER
        manifest = combined_training_folder(
            base=Path(args.data), pool=pool.folder, out=folder, seed=args.seed, jobs=args.jobs or cpu_count()
        )
        pool_series = sum(1 for e in manifest["series"] if e.get("pool"))
        log.info("training the detector (%s recipe) with %d pool series counted as normal", args.recipe, pool_series)
        training = argparse.Namespace(**{**vars(args), "data": folder})
        rc = train_detector(training)
        if rc != 0:
            return rc
        record = register_candidate(
            sessions=sessions,
            settings=settings,
            kind=ModelKind.DETECTOR,
            folder=Path(args.out),
            actor=args.by,
            training_data={
                "pool_entry_ids": pool.entry_ids,
                "pool_source": pool.source,
                "pool_series": pool_series,
                "pool_kinds": pool.kinds,
                "base_data": str(args.data),
                "base_data_hash": base_series_hash(manifest),
                "parent_version": parent.version,
                "recipe": args.recipe,
            },
        )
    print(
        f"detector {record.version} registered as a {record.status} in {time.monotonic() - t0:.0f} s "
        f"({pool_series} pool series counted as normal); compare it with "
        f"`gatekeeper evaluate candidate detector {record.version}`"
    )
    return 0
