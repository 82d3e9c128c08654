"""`gatekeeper evaluate candidate KIND VERSION`: is promoting this candidate safe?

    gatekeeper evaluate candidate segmenter VERSION [--data DIR] [--tolerance 0.01] [--json] [--out DIR]
    gatekeeper evaluate candidate detector VERSION [--data DIR] [--tolerance 0.05] [--json] [--out DIR]

The registry's active version and the candidate run (ONNX Runtime, as the workers run them) on
the same fixed held-out set: `--data` (a phantom run; its manifest names each series' anomaly
type, its ground truth the liver), or by default a phantom set of `--per-type` series of every
type (normal and each anomaly type), `--slices` × `--matrix`², from patients no training set
draws (seeds from 2 000 000 up), generated once under `storage_dir/evaluation/heldout-<hash>/`
and reused. The kinds the candidate must do better on are those its training pool recorded
(`--pool-kinds` overrides; default tumor, fluid, stent).

Segmenter — per series the 3-D Dice against the ground-truth liver. Checks:
  1. normals: the candidate's mean Dice is at least the active one's minus `--tolerance` (0.01);
  2. the pool's kinds: the candidate's mean Dice over those series is higher than the active one's.
Detector — per series the score ÷ threshold and whether it is flagged (sent to a person). Checks:
  1. normals: the share flagged rises by at most `--tolerance` (0.05);
  2. the pool's kinds: fewer flagged (or as many, with lower scores) — the segmenter handles them now;
  3. every other anomaly type: the share flagged falls by at most `--tolerance` (the gate must still
     stop what the segmenter has not learnt).

Promotion is safe when every check passes; a check with no series to measure fails. Exit code 0:
safe; 1: not safe; 2: a usage error. `--json` prints the report; `--out DIR` writes report.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from models.active_learning.config import DEFAULT_POOL_KINDS, DEFAULT_TOLERANCE
from models.active_learning.pool import active_folder, anomaly_type
from service.db.tables import ModelKind
from service.errors import UsageError
from service.model_registry import ModelRecord, RegistryError, find_model, verify_files
from service.settings import Settings, load_settings_or_exit

log = logging.getLogger(__name__)

#: Patient and series seeds of the generated held-out set start here: above every seed a training set draws.
HELDOUT_SEED_BASE = 2_000_000
#: Exit codes: promotion safe, not safe.
EXIT_SAFE, EXIT_NOT_SAFE = 0, 1


@dataclass
class SeriesResult:
    """One held-out series under both versions: Dice (segmenter) or score ÷ threshold (detector)."""

    folder: str
    series_instance_uid: str
    anomaly: str
    active: float
    candidate: float
    active_flagged: bool | None = None
    candidate_flagged: bool | None = None


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


# --- the held-out set ---------------------------------------------------------------------------------


def heldout_specs(*, types: Sequence[str], per_type: int, slices: int, matrix: int, seed: int) -> list[Any]:
    """The generated held-out set: `per_type` series of each type, seeded, patients above `HELDOUT_SEED_BASE`."""
    from service.phantom.generate import SeriesSpec

    rng = np.random.default_rng([seed, 0xE7A1])
    seeds = HELDOUT_SEED_BASE + rng.choice(1_000_000, size=(len(types) * per_type, 2), replace=False)
    specs = []
    for n, kind in enumerate(t for t in types for _ in range(per_type)):
        specs.append(
            SeriesSpec(
                folder=f"{n:03d}_{kind}",
                patient_seed=int(seeds[n, 0]),
                series_seed=int(seeds[n, 1]),
                anomaly=None if kind == "normal" else kind,
                num_slices=slices,
                matrix=matrix,
                split="test",
            )
        )
    return specs


def heldout_folder(*, settings: Settings, args: argparse.Namespace) -> Path:
    """`args.data`, or the generated held-out set (made now if it is not there yet).

    Raises:
        UsageError: `--data` is no folder, or the generated set's options are impossible.
    """
    if args.data is not None:
        if not Path(args.data).is_dir():
            raise UsageError(f"--data {args.data}: no such folder")
        return Path(args.data)
    from service.phantom.anomalies import ANOMALY_TYPES
    from service.phantom.generate import generate_run

    types = [t.strip() for t in args.types.split(",")] if args.types else ["normal", *ANOMALY_TYPES]
    unknown = [t for t in types if t != "normal" and t not in ANOMALY_TYPES]
    if unknown or not types:
        raise UsageError(f"--types: unknown type {unknown[0] if unknown else ''!r}; normal or one of {ANOMALY_TYPES}")
    if args.per_type < 1 or args.slices < 2 or args.matrix < 32:
        raise UsageError("--per-type must be >= 1, --slices >= 2 and --matrix >= 32")
    key = json.dumps([types, args.per_type, args.slices, args.matrix, args.seed]).encode()
    folder = settings.storage_dir / "evaluation" / f"heldout-{hashlib.sha256(key).hexdigest()[:12]}"
    if (folder / "manifest.json").is_file():
        return folder
    specs = heldout_specs(types=types, per_type=args.per_type, slices=args.slices, matrix=args.matrix, seed=args.seed)
    log.info("generating the held-out set (%d series) under %s, once", len(specs), folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    generate_run(specs, tmp, progress=not args.no_progress, meta={"purpose": "held-out set of evaluate candidate"})
    tmp.rename(folder)
    return folder


def _heldout_series(root: Path) -> tuple[list[Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """(CT SeriesFiles, liver contours by UID, manifest entries by UID) under `root`, in folder order."""
    from models.detector.data import cpu_count, scan_parallel
    from models.segmenter.contours import find_liver_contours
    from service import dicom_series

    groups = scan_parallel(root, min(2, cpu_count()))
    contours = find_liver_contours(groups)
    entries: dict[str, dict[str, Any]] = {}
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        entries = {e["series_instance_uid"]: e for e in manifest.get("series", [])}
    except (OSError, ValueError, KeyError):
        log.warning("%s has no readable manifest.json: every series counts as type 'unknown'", root)
    cts = sorted(dicom_series.ct_series_in(groups), key=lambda g: str(g.folder))
    return cts, contours, entries


# --- running both versions ----------------------------------------------------------------------------


def evaluate_segmenters(
    active: Path, candidate: Path, root: Path, *, progress: bool = True, on_series: Callable[[str], None] | None = None
) -> list[SeriesResult]:
    """3-D Dice of both segmenters against the ground-truth liver of every contoured series under `root`."""
    from service import dicom_series
    from service.segmentation import Segmenter, dice

    models = (Segmenter(active), Segmenter(candidate))
    cts, contours, entries = _heldout_series(root)
    cts = [g for g in cts if g.series_instance_uid in contours]
    results = []
    for g in tqdm(cts, desc="segmenters", unit="series", disable=not progress):
        series = dicom_series.load_series(g)
        truth = contours[g.series_instance_uid].volume_for(series)
        a, c = (dice(m.segment(series).mask, truth) for m in models)
        results.append(
            SeriesResult(
                folder=str(Path(g.folder).relative_to(root)),
                series_instance_uid=g.series_instance_uid,
                anomaly=anomaly_type(entries.get(g.series_instance_uid)),
                active=round(a, 5),
                candidate=round(c, 5),
            )
        )
        if on_series is not None:
            on_series(results[-1].folder)
    return results


def evaluate_detectors(
    active: Path, candidate: Path, root: Path, *, progress: bool = True, on_series: Callable[[str], None] | None = None
) -> list[SeriesResult]:
    """Score ÷ threshold and the flag of both detectors for every CT series under `root`."""
    from service import dicom_series
    from service.inference import load_detector

    models = (load_detector(active), load_detector(candidate))
    cts, _, entries = _heldout_series(root)
    results = []
    for g in tqdm(cts, desc="detectors", unit="series", disable=not progress):
        try:
            series = dicom_series.load_series(g)
        except dicom_series.SeriesError as exc:
            log.warning("skipping %s: %s", g.folder, exc.problem)
            continue
        a, c = (m.score_series(series) for m in models)
        results.append(
            SeriesResult(
                folder=str(Path(g.folder).relative_to(root)),
                series_instance_uid=g.series_instance_uid,
                anomaly=anomaly_type(entries.get(g.series_instance_uid)),
                active=round(a.score / a.threshold, 5) if a.threshold else a.score,
                candidate=round(c.score / c.threshold, 5) if c.threshold else c.score,
                active_flagged=a.flagged,
                candidate_flagged=c.flagged,
            )
        )
        if on_series is not None:
            on_series(results[-1].folder)
    return results


# --- the verdict ---------------------------------------------------------------------------------------


def per_type(results: Sequence[SeriesResult]) -> dict[str, dict[str, Any]]:
    """Per anomaly type: n, mean of each version, and for a detector the share flagged by each."""
    table = {}
    for kind in sorted({r.anomaly for r in results}, key=lambda k: (k != "normal", k)):
        rows = [r for r in results if r.anomaly == kind]
        entry: dict[str, Any] = {
            "n": len(rows),
            "active_mean": round(float(np.mean([r.active for r in rows])), 5),
            "candidate_mean": round(float(np.mean([r.candidate for r in rows])), 5),
        }
        if rows[0].active_flagged is not None:
            entry["active_flagged"] = round(float(np.mean([bool(r.active_flagged) for r in rows])), 4)
            entry["candidate_flagged"] = round(float(np.mean([bool(r.candidate_flagged) for r in rows])), 4)
        table[kind] = entry
    return table


def _mean(results: Sequence[SeriesResult], kinds: Sequence[str], field: str) -> float:
    return float(np.mean([float(getattr(r, field)) for r in results if r.anomaly in kinds]))


def segmenter_checks(results: Sequence[SeriesResult], *, pool_kinds: Sequence[str], tolerance: float) -> list[Check]:
    """Normals: mean Dice not below the active one's − tolerance. Pool kinds: mean Dice higher."""
    checks = []
    normals = [r for r in results if r.anomaly == "normal"]
    if normals:
        a, c = _mean(normals, ["normal"], "active"), _mean(normals, ["normal"], "candidate")
        checks.append(
            Check(
                "normals",
                c >= a - tolerance,
                f"mean Dice {c:.4f} vs active {a:.4f} on {len(normals)} series (tolerance {tolerance:g})",
            )
        )
    else:
        checks.append(Check("normals", False, "no normal series in the held-out set: not measured"))
    pool = [r for r in results if r.anomaly in pool_kinds]
    if pool:
        a, c = _mean(pool, pool_kinds, "active"), _mean(pool, pool_kinds, "candidate")
        checks.append(
            Check(
                "pool kinds",
                c > a,
                f"mean Dice {c:.4f} vs active {a:.4f} on {len(pool)} series of {', '.join(pool_kinds)}",
            )
        )
    else:
        checks.append(Check("pool kinds", False, f"no series of {', '.join(pool_kinds)} in the held-out set"))
    return checks


def _flag_share(rows: Sequence[SeriesResult], field: str) -> float:
    return float(np.mean([bool(getattr(r, field)) for r in rows]))


def detector_checks(results: Sequence[SeriesResult], *, pool_kinds: Sequence[str], tolerance: float) -> list[Check]:
    """Normals: share flagged up by at most tolerance. Pool kinds: fewer flagged. Other types: recall kept."""
    checks = []
    normals = [r for r in results if r.anomaly == "normal"]
    if normals:
        a, c = _flag_share(normals, "active_flagged"), _flag_share(normals, "candidate_flagged")
        checks.append(
            Check(
                "normals",
                c <= a + tolerance,
                f"{c:.0%} flagged vs active {a:.0%} of {len(normals)} series (tolerance {tolerance:g})",
            )
        )
    else:
        checks.append(Check("normals", False, "no normal series in the held-out set: not measured"))
    pool = [r for r in results if r.anomaly in pool_kinds]
    if pool:
        a, c = _flag_share(pool, "active_flagged"), _flag_share(pool, "candidate_flagged")
        sa, sc = _mean(pool, pool_kinds, "active"), _mean(pool, pool_kinds, "candidate")
        checks.append(
            Check(
                "pool kinds",
                c < a or (c == a and sc < sa),
                f"{c:.0%} flagged vs active {a:.0%} (mean score/threshold {sc:.3f} vs {sa:.3f}) on {len(pool)} "
                f"series of {', '.join(pool_kinds)}",
            )
        )
    else:
        checks.append(Check("pool kinds", False, f"no series of {', '.join(pool_kinds)} in the held-out set"))
    others = [r for r in results if r.anomaly not in (*pool_kinds, "normal", "unknown")]
    if others:
        a, c = _flag_share(others, "active_flagged"), _flag_share(others, "candidate_flagged")
        kinds = sorted({r.anomaly for r in others})
        checks.append(
            Check(
                "other anomalies",
                c >= a - tolerance,
                f"{c:.0%} flagged vs active {a:.0%} of {len(others)} series of {', '.join(kinds)} "
                f"(tolerance {tolerance:g})",
            )
        )
    return checks


def _candidate(*, sessions: Any, kind: ModelKind, version: str) -> ModelRecord:
    with sessions() as session:
        record = find_model(session=session, kind=kind, version=version)
    if record is None:
        raise UsageError(f"no {kind.value} version {version!r} is registered (see `gatekeeper models list`)")
    return record


def run_cli(args: argparse.Namespace) -> int:
    """Evaluate, print the report, return `EXIT_SAFE` or `EXIT_NOT_SAFE`."""
    from service.db.schema import open_database

    kind = ModelKind(args.kind)
    tolerance = DEFAULT_TOLERANCE[kind.value] if args.tolerance is None else float(args.tolerance)
    if tolerance < 0:
        raise UsageError(f"--tolerance must be >= 0, got {tolerance}")
    settings = load_settings_or_exit()
    t0 = time.monotonic()
    with open_database(settings) as sessions:
        candidate = _candidate(sessions=sessions, kind=kind, version=args.version)
        active, active_dir = active_folder(sessions=sessions, settings=settings, kind=kind)
        try:
            candidate_dir = verify_files(candidate, settings)
        except RegistryError as exc:
            raise UsageError(str(exc)) from None
    if active.version == candidate.version:
        raise UsageError(f"{kind.value} {args.version} is the active version; nothing to compare it with")
    if args.pool_kinds:
        pool_kinds = [k.strip() for k in args.pool_kinds.split(",") if k.strip()]
    else:
        pool_kinds = list(candidate.training_data.get("pool_kinds") or DEFAULT_POOL_KINDS)
    root = heldout_folder(settings=settings, args=args)
    log.info("%s %s (candidate) vs %s (active) on %s", kind.value, candidate.version, active.version, root)
    evaluate = evaluate_segmenters if kind == ModelKind.SEGMENTER else evaluate_detectors
    results = evaluate(active_dir, candidate_dir, root, progress=not args.no_progress)
    if not results:
        raise UsageError(f"no usable held-out series under {root}")
    checks = (segmenter_checks if kind == ModelKind.SEGMENTER else detector_checks)(
        results, pool_kinds=pool_kinds, tolerance=tolerance
    )
    safe = all(c.passed for c in checks)
    report = {
        "kind": kind.value,
        "candidate": candidate.version,
        "active": active.version,
        "heldout": str(root),
        "series": len(results),
        "measure": "dice" if kind == ModelKind.SEGMENTER else "score/threshold, flagged",
        "pool_kinds": pool_kinds,
        "tolerance": tolerance,
        "per_type": per_type(results),
        "checks": [asdict(c) for c in checks],
        "safe": safe,
        "seconds": round(time.monotonic() - t0, 1),
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        full = {**report, "per_series": [asdict(r) for r in results]}
        (args.out / "report.json").write_text(json.dumps(full, indent=1) + "\n")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(_text(report))
    return EXIT_SAFE if safe else EXIT_NOT_SAFE


def _text(report: dict[str, Any]) -> str:
    detector = report["kind"] == "detector"
    lines = [
        f"{report['kind']} {report['candidate']} (candidate) vs {report['active']} (active): "
        f"{report['series']} held-out series under {report['heldout']}",
        f"{'type':<16} {'n':>3} {'active':>8} {'candidate':>9}" + (f" {'flagged a→c':>13}" if detector else ""),
    ]
    for kind, row in report["per_type"].items():
        line = f"{kind:<16} {row['n']:>3} {row['active_mean']:>8.4f} {row['candidate_mean']:>9.4f}"
        if detector:
            line += f" {row['active_flagged']:>6.0%} → {row['candidate_flagged']:>4.0%}"
        lines.append(line)
    lines.append("(mean Dice against the ground-truth liver)" if not detector else "(mean score ÷ threshold)")
    for check in report["checks"]:
        lines.append(f"{'pass' if check['passed'] else 'FAIL'}  {check['name']}: {check['detail']}")
    lines.append("promotion is SAFE" if report["safe"] else "promotion is NOT safe")
    return "\n".join(lines)
