"""`gatekeeper commission`: a site's normal series in, a site-calibrated gate (as candidates) and a report out.

    gatekeeper commission --normals DIR --out REPORT_DIR [--contours DIR] [--abnormal DIR]
                          [--minutes M] [--jobs N] [--seed S] [--by NAME]

Stages (one line each on stdout; `models.commission.<stage>`):

1. `split` — the CT series under --normals (any folder tree), split patient-wise into train /
   detector validation / gate calibration / held-out (`split.ROLES`); the contours of --contours
   matched to their series by the referenced Series Instance UID; too few series: exit 2 naming the
   minimum;
2. `train` — the detector (`gatekeeper train detector`, the active detector's family and size, at most
   --minutes of training) on train, normalised on detector validation;
3. `calibrate` — the gate on the gate-calibration normals (active segmenter, the new detector);
4. `train` — with contours: the active segmenter fine-tuned on the contoured series outside held-out;
5. `evaluate` — held-out normals and --abnormal series through the new gate; Dice against the contours;
   refused (exit 2) when a model was trained or calibrated on a reported series;
6. registration of every new model as a candidate in the model registry, and `report` (report.json,
   report.html).

Everything is written under REPORT_DIR; a stopped run started again with the same arguments resumes
(the split, the trained models and every measured series are reused).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def register_commands(groups: Mapping[str, argparse._SubParsersAction[argparse.ArgumentParser]]) -> None:
    """Add `gatekeeper commission` to the top-level commands (entry point of `gatekeeper.commands`)."""
    p = groups["top"].add_parser(
        "commission",
        help="commission the gate on a site's own normal series (needs the 'train' extra: torch)",
        description="Split a site's normal CT series patient-wise, train the detector, calibrate the gate, "
        "evaluate on held-out series, fine-tune the segmenter on the site's contours, register every new "
        "model as a candidate and write REPORT_DIR/report.html and report.json.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--normals", type=Path, required=True, help="folder tree of the site's normal CT series")
    p.add_argument("--out", type=Path, required=True, help="report folder (models, cache, report.html)")
    p.add_argument("--contours", type=Path, default=None, help="folder of liver contours (RTSTRUCT or SEG)")
    p.add_argument("--abnormal", type=Path, default=None, help="folder of known-abnormal CT series")
    p.add_argument("--minutes", type=float, default=60.0, help="time budget of the detector training (default 60)")
    p.add_argument("--jobs", type=int, default=1, help="processes for reading and measuring series (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the training (default 0)")
    p.add_argument(
        "--false-flag-rate", type=float, default=0.05, help="share of normals the gate may flag (default 0.05)"
    )
    p.add_argument("--shadow-days", type=int, default=14, help="days of shadow mode the report asks for (default 14)")
    p.add_argument("--by", default=None, help="who registers the candidates (default: your login name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    g = p.add_argument_group("training sizes (defaults: the active detector's recipe)")
    g.add_argument("--detector-family", default=None, help="detector network family (default: the active one's)")
    g.add_argument("--detector-size", type=int, default=None, choices=(64, 128, 256), help="detector slice size")
    g.add_argument("--detector-batch", type=int, default=32, help="detector batch (multiple of 4; default 32)")
    g.add_argument(
        "--detector-steps", type=int, default=None, help="cap every detector phase at this many steps (smoke tests)"
    )
    g.add_argument("--fine-tune-steps", type=int, default=300, help="segmenter fine-tune steps (default 300)")
    g.add_argument(
        "--fine-tune-minutes", type=float, default=15.0, help="time cap of the segmenter fine-tune (default 15)"
    )


def _stage(name: str, started: float, text: str) -> None:
    """The one line of a finished stage."""
    print(f"commission: {name}: {text} ({time.monotonic() - started:.0f} s)", flush=True)


def _check_args(args: argparse.Namespace) -> None:
    from service.errors import UsageError

    for name in ("normals", "contours", "abnormal"):
        folder = getattr(args, name)
        if folder is not None and not folder.is_dir():
            raise UsageError(f"--{name} {folder}: no such folder")
    if not args.minutes > 0:
        raise UsageError(f"--minutes must be > 0, got {args.minutes}")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    if not 0 < args.false_flag_rate < 0.5:
        raise UsageError(f"--false-flag-rate must be in (0, 0.5), got {args.false_flag_rate}")
    if args.fine_tune_steps < 1 or (args.detector_steps is not None and args.detector_steps < 1):
        raise UsageError("--fine-tune-steps and --detector-steps must be >= 1")


def run(args: argparse.Namespace) -> int:
    """Run every stage (see the module docstring); 0 when the report is written."""
    from models.commission import split as split_stage
    from models.detector.data import scan_parallel
    from models.segmenter.contours import find_liver_contours
    from service import dicom_series
    from service.errors import UsageError

    _check_args(args)
    t_start = time.monotonic()
    progress = not args.no_progress and sys.stderr.isatty()
    t0 = time.monotonic()
    normals = [g for g in dicom_series.ct_series_in(scan_parallel(args.normals, args.jobs)) if len(g.instances) >= 2]
    abnormal = dicom_series.ct_series_in(scan_parallel(args.abnormal, args.jobs)) if args.abnormal else []
    both = {g.series_instance_uid for g in normals} & {g.series_instance_uid for g in abnormal}
    if both:
        raise UsageError(f"series {sorted(both)[0]} is under both --normals and --abnormal")
    contours = {}
    if args.contours is not None:
        contours = find_liver_contours(normals + dicom_series.scan_tree(args.contours))
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        split, reused = split_stage.load_or_make_split(
            args.out, normals, seed=args.seed, contoured=set(contours), abnormal=abnormal
        )
    except split_stage.TooFewNormals as exc:
        raise UsageError(f"--normals {args.normals}: {exc}") from None
    _stage(
        "split",
        t0,
        ("reused " if reused else "")
        + ", ".join(f"{role} {split.patients[role]} patients/{len(u)} series" for role, u in split.roles.items())
        + f"; {len(split.contoured)} contoured, {len(split.abnormal)} abnormal",
    )
    return _run_stages(args, split, normals, abnormal, contours, progress, t_start)


def _register_candidates(
    sessions: Any, settings: Any, folders: dict[str, Path | None], *, args: argparse.Namespace, split: Any
) -> dict[str, str | None]:
    """Register every model folder commissioning made as a *candidate* in the model registry; return the
    version per kind (None where no model was made, e.g. no segmenter without --contours)."""
    from models.active_learning.pool import register_candidate
    from service.db.tables import ModelKind

    candidates: dict[str, str | None] = {}
    for name, folder in folders.items():
        if folder is None:
            candidates[name] = None
            continue
        record = register_candidate(
            sessions=sessions,
            settings=settings,
            kind=ModelKind(name),
            folder=folder,
            actor=args.by,
            training_data={
                "commission": str(args.out.resolve()),
                "split_fingerprint": split.fingerprint,
                "pool_entry_ids": [],
            },
        )
        candidates[name] = record.version
    return candidates


def _run_stages(
    args: argparse.Namespace,
    split: Any,
    normals: list[Any],
    abnormal: list[Any],
    contours: dict[str, Any],
    progress: bool,
    t_start: float,
) -> int:
    from models.active_learning.pool import active_folder
    from models.commission import calibrate, evaluate, train
    from service.db.schema import open_database
    from service.db.tables import ModelKind
    from service.settings import load_settings_or_exit

    groups = {g.series_instance_uid: g for g in normals + abnormal}
    settings = load_settings_or_exit()
    models_dir, work = args.out / "models", args.out / "work"
    with open_database(settings) as sessions:
        active = {kind: active_folder(sessions=sessions, settings=settings, kind=kind) for kind in ModelKind}
        seg_dir = active[ModelKind.SEGMENTER][1]
        reported = split.roles["held_out"] + split.abnormal
        evaluate.refuse_leakage(reported, {"the active segmenter": seg_dir})

        t0 = time.monotonic()
        shipped_detector = json.loads((active[ModelKind.DETECTOR][1] / "model.json").read_text())
        recipe = train.DetectorRecipe.like(
            shipped_detector,
            family=args.detector_family,
            size=args.detector_size,
            minutes=args.minutes,
            steps=args.detector_steps,
            batch=args.detector_batch,
        )
        det_dir = train.train_detector(
            out=models_dir / "detector",
            view=work / "detector-data",
            split=split,
            groups=groups,
            recipe=recipe,
            jobs=args.jobs,
            progress=progress,
        )
        _stage("train detector", t0, f"{recipe.family} {recipe.size} px → {det_dir}")

        t0 = time.monotonic()
        gate_dir, calibrated_on = calibrate.calibrate_gate(
            out=models_dir / "gate",
            root=args.out,
            groups=[groups[u] for u in split.roles["gate_calibration"]],
            segmenter_dir=seg_dir,
            detector_dir=det_dir,
            false_flag_rate=args.false_flag_rate,
            jobs=args.jobs,
            progress=progress,
        )
        _stage("calibrate gate", t0, f"on {len(calibrated_on)} gate-calibration normals → {gate_dir}")

        t0 = time.monotonic()
        fine = train.FineTune(None, "no --contours given", [], [])
        if contours:
            fine = train.fine_tune_segmenter(
                out=models_dir / "segmenter",
                views=work / "segmenter-data",
                split=split,
                groups=groups,
                contour_files={uid: c.path for uid, c in contours.items()},
                active_folder=seg_dir,
                steps=args.fine_tune_steps,
                minutes=args.fine_tune_minutes,
                jobs=args.jobs,
                progress=progress,
            )
        _stage("fine-tune segmenter", t0, str(fine.folder) if fine.folder else f"skipped: {fine.reason}")

        t0 = time.monotonic()
        jobs_list = [evaluate.Job(groups[u], contours.get(u), "normal") for u in split.roles["held_out"]]
        jobs_list += [evaluate.Job(groups[u], None, "abnormal") for u in split.abnormal]
        outcomes = evaluate.evaluate(
            root=args.out,
            jobs_list=jobs_list,
            segmenter_dir=seg_dir,
            detector_dir=det_dir,
            gate_dir=gate_dir,
            candidate_dir=fine.folder,
            jobs=args.jobs,
            progress=progress,
        )
        summary = evaluate.summarise(outcomes, args.false_flag_rate)
        lo, hi = summary["false_flag_rate_ci95"]
        _stage(
            "evaluate",
            t0,
            f"{summary['false_flags']}/{summary['held_out_normals']} held-out normals flagged "
            f"(95 % CI {100 * lo:.0f}–{100 * hi:.0f} %)",
        )

        t0 = time.monotonic()
        folders = {"detector": det_dir, "gate": gate_dir, "segmenter": fine.folder}
        candidates = _register_candidates(sessions, settings, folders, args=args, split=split)
        _stage("register", t0, ", ".join(f"{k} {v}" for k, v in candidates.items() if v) + " as candidates")

    t0 = time.monotonic()
    shipped_gate = json.loads((active[ModelKind.GATE][1] / "gate.json").read_text())
    site_gate = json.loads((gate_dir / "gate.json").read_text())
    doc = _report_doc(args, split, normals, abnormal, contours, summary, site_gate, shipped_gate, candidates, fine)
    doc["wall_seconds"] = time.monotonic() - t_start
    from models.commission.report import write_report

    json_path, html_path = write_report(args.out, doc, evaluate.outcomes_as_json(outcomes))
    _stage("report", t0, f"{html_path} and {json_path.name}")
    return 0


def _report_doc(
    args: argparse.Namespace,
    split: Any,
    normals: list[Any],
    abnormal: list[Any],
    contours: dict[str, Any],
    summary: dict[str, Any],
    site_gate: dict[str, Any],
    shipped_gate: dict[str, Any],
    candidates: dict[str, str | None],
    fine: Any,
) -> dict[str, Any]:
    from models.commission.report import next_steps, signal_ranges

    fusion = site_gate.get("fusion", {})
    return {
        "format": 1,
        "kind": "gatekeeper-commissioning-report",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "gatekeeper " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "data": {
            "normals_folder": str(args.normals),
            "normal_series": len(normals),
            "contoured_series": len(contours),
            "abnormal_series": len(abnormal),
            "skipped_series": len(summary["unreadable"]),
        },
        "split": split.as_json(),
        "gate": {
            "version": site_gate.get("version"),
            "fused_threshold": fusion.get("threshold"),
            "loo_false_flag_rate": fusion.get("loo_false_flag_rate"),
            "shipped_version": shipped_gate.get("version"),
        },
        "signals": signal_ranges(site_gate, shipped_gate),
        "evaluation": summary,
        "candidates": candidates,
        "not_trained": {"segmenter": fine.reason} if fine.folder is None else {},
        "leakage": "Every model.json and gate.json lists the Series Instance UIDs it was trained or calibrated on; "
        "none of the reported (held-out and abnormal) series is among them for the active segmenter, the new "
        "detector, the new gate or the fine-tuned segmenter (checked before the evaluation). The detector's "
        "normalisation was fitted on the detector-validation series, the gate's thresholds on the disjoint "
        "gate-calibration series.",
        "next_steps": next_steps(candidates, args.shadow_days),
    }
