"""`gatekeeper calibrate gate`: fit the gate's references and thresholds on normal validation series.

    gatekeeper calibrate gate --data DIR [--split validation] --out models/gate/default
        [--false-flag-rate 0.05] [--segmenter DIR] [--detector DIR] [--jobs N]
        [--population-report PATH_OR_URL] [--population-site NAME]

Every CT series under `--data` that its phantom manifest(s) call normal (no anomaly) and put in
`--split` is segmented with the test-time views and scored by the detector; `service.gate.calibrate`
fits the Mahalanobis reference and the liver's HU band, each signal's centre and scale, and the fused
cut at `--false-flag-rate` (see `service.gate`). Without a manifest, every CT series is taken as
normal (a hospital's own normal validation series); a manifest whose entries carry no split uses all
its normal series. Nothing is fitted on anomalous series. Writes gate.json and its reference file to
`--out`. ONNX Runtime only (no torch). gate.json's `calibration_population` says what the gate was
calibrated on (`population_of`): "phantom" data (every series in a phantom manifest) or a "site"'s own
series, how many, the date, and `--population-report` / `--population-site` when given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import multiprocessing
import pickle
import shlex
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service import dicom_series
from service.errors import UsageError
from service.model_paths import DEFAULT_DETECTOR_DIR, DEFAULT_GATE_DIR

if TYPE_CHECKING:
    from service.gate import Gate, Observation
    from service.inference import Detector, PatchDetector
    from service.segmentation import Segmenter

log = logging.getLogger(__name__)

#: The gate shipped with the code (`Settings.gate_model_dir` defaults here too).


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="calibrate the gate on normal series",
        description="Calibrate a model on normal validation series (ONNX Runtime only).",
    )
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    g = what.add_parser(
        "gate",
        help="fit the gate's references, signal thresholds and fused cut on normal series",
        description="Segment (with test-time views) and score every normal series of --split under --data, fit "
        "each signal's calibration and the fused cut at --false-flag-rate, and write gate.json + reference.npz.",
    )
    g.add_argument("--data", type=Path, required=True, help="folder tree of CT series (phantom run or normals)")
    g.add_argument(
        "--split",
        default="validation",
        help="manifest split of the normal series to use (default validation; 'all': every normal series)",
    )
    g.add_argument("--out", type=Path, default=DEFAULT_GATE_DIR, help=f"gate folder (default {DEFAULT_GATE_DIR})")
    g.add_argument(
        "--false-flag-rate",
        type=float,
        default=0.05,
        help="share of normal series the gate may send to manual contouring (default 0.05)",
    )
    g.add_argument("--segmenter", type=Path, default=None, help="segmenter model folder (default: shipped)")
    g.add_argument("--detector", type=Path, default=None, help="detector model folder (default: shipped)")
    g.add_argument("--jobs", type=int, default=1, help="series measured in parallel processes (default 1)")
    g.add_argument(
        "--observations",
        type=Path,
        default=None,
        help="cache of the measurements (pickle written by this command): reused when it exists, so that a "
        "recalibration at another --false-flag-rate does not segment again",
    )
    g.add_argument(
        "--population-report",
        default=None,
        metavar="PATH_OR_URL",
        help="the report on the calibration data (e.g. the commissioning report), written to gate.json's "
        "calibration_population; status, /readyz and the worklist header show it",
    )
    g.add_argument(
        "--population-site",
        default=None,
        metavar="NAME",
        help="the site whose series these are (default: the phantom site profile for phantom data, none otherwise)",
    )
    g.set_defaults(func=run)


def read_manifests(root: Path) -> dict[str, dict[str, Any]]:
    """Every phantom manifest entry under `root` (manifest.json files at any depth), by SeriesInstanceUID."""
    entries: dict[str, dict[str, Any]] = {}
    for manifest in sorted(root.rglob("manifest.json")):
        try:
            doc = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable manifest %s: %s", manifest, exc)
            continue
        for e in doc.get("series", []) if isinstance(doc, dict) else []:
            if isinstance(e, dict) and "series_instance_uid" in e:
                entries[e["series_instance_uid"]] = {**e, "_root": str(manifest.parent)}
    return entries


def population_of(
    root: Path, used: list[dicom_series.SeriesFiles], *, report: str | None, site: str | None
) -> dict[str, Any]:
    """gate.json's `calibration_population` for a calibration on `used` under `root`: kind "phantom" when
    every series has a phantom manifest entry (site: the phantom site profile, when not the default one),
    else "site"; `series` how many, `date` today (UTC), and `report` and `site` when given."""
    entries = read_manifests(root)
    phantom = bool(used) and all(g.series_instance_uid in entries for g in used)
    if site is None and phantom:
        profiles = {str((entries[g.series_instance_uid].get("site") or {}).get("name", "default")) for g in used}
        site = None if profiles == {"default"} else ", ".join(sorted(profiles))
    block: dict[str, Any] = {
        "kind": "phantom" if phantom else "site",
        "series": len(used),
        "date": dt.datetime.now(dt.UTC).date().isoformat(),
    }
    if report is not None:
        block["report"] = report
    if site is not None:
        block["site"] = site
    return block


def anomaly_type(entry: dict[str, Any] | None) -> str:
    """ "normal", the phantom's anomaly type, the scan range of an off-target series ("chest", "pelvis",
    "liver_partial": manifest `category` "off_target"), or "unknown" without a manifest entry."""
    if entry is None:
        return "unknown"
    if entry.get("category") == "off_target":
        return str((entry.get("scan_range") or {}).get("kind") or "off_target")
    return str((entry.get("anomaly") or {}).get("type") or "normal")


def normal_series(root: Path, split: str) -> list[dicom_series.SeriesFiles]:
    """The normal CT series of `split` under `root` (see the module docstring).

    Raises:
        UsageError: none found.
    """
    groups = dicom_series.ct_series_in(dicom_series.scan_tree(root))
    entries = read_manifests(root)
    if entries:
        normals = [g for g in groups if anomaly_type(entries.get(g.series_instance_uid)) == "normal"]
        has_splits = any(e.get("split") for e in entries.values())
        if split != "all" and has_splits:
            normals = [g for g in normals if entries[g.series_instance_uid].get("split") == split]
        elif split != "all":
            log.info("the manifest has no splits: all %d normal series are used", len(normals))
    else:
        log.warning("%s: no manifest.json; every CT series is taken as a normal series", root)
        normals = groups
    if not normals:
        raise UsageError(f"--data {root}: no normal CT series" + ("" if split == "all" else f" in split {split!r}"))
    return sorted(normals, key=lambda g: str(g.folder))


# --- the models, loaded once per process --------------------------------------------------------------

_MODELS: dict[str, Any] = {}


def load_models(segmenter_dir: str | None, detector_dir: str | None, gate_dir: str | None = None) -> None:
    """Load the segmenter, the detector (optional) and the gate into this process (pool initializer)."""
    from service.gate import Gate
    from service.inference import load_detector
    from service.segmentation import DEFAULT_MODEL_DIR, Segmenter

    key = (segmenter_dir, detector_dir, gate_dir)
    if _MODELS.get("key") == key:
        return
    _MODELS["key"] = key
    _MODELS["segmenter"] = Segmenter(segmenter_dir or DEFAULT_MODEL_DIR)
    _MODELS["detector"] = load_detector(detector_dir) if detector_dir else None
    _MODELS["gate"] = Gate.load(gate_dir) if gate_dir else None


def models() -> tuple[Segmenter, Detector | PatchDetector | None, Gate | None]:
    return _MODELS["segmenter"], _MODELS["detector"], _MODELS["gate"]


def evidence_of(detector: Detector | PatchDetector | None, series: dicom_series.CTSeries) -> Any:
    """The detector's `DetectorEvidence` on `series` (None without a detector)."""
    from service.gate import DetectorEvidence

    if detector is None:
        return None
    verdict = detector.score_series(series)
    return DetectorEvidence(
        score=verdict.score,
        threshold=verdict.threshold,
        slice_scores=tuple(s.score for s in verdict.slices),
        model_version=str(detector.version),
    )


def _observe_one(files: dicom_series.SeriesFiles) -> tuple[str, Observation | None, float, str]:
    """(uid, observation or None, seconds, error) for one series, with this process's models."""
    from service.gate import DEFAULT_VIEWS, observe

    t0 = time.monotonic()
    segmenter, detector, _ = models()
    try:
        series = dicom_series.load_series(files)
    except dicom_series.SeriesError as exc:
        return files.series_instance_uid, None, time.monotonic() - t0, str(exc)
    evidence = evidence_of(detector, series)
    _, obs, _ = observe(series=series, segmenter=segmenter, detector=evidence, views=DEFAULT_VIEWS)
    return files.series_instance_uid, obs, time.monotonic() - t0, ""


def map_with_progress(fn: Any, items: list[Any], jobs: int, init_args: tuple[Any, ...], what: str) -> Iterable[Any]:
    """fn over items in `jobs` processes (models loaded once per process), in order, logging progress."""
    t0 = time.monotonic()
    n = len(items)
    results: Iterable[Any]
    if jobs <= 1:
        load_models(*init_args)
        results = map(fn, items)
        pool = None
    else:
        # spawn, not fork: a forked child would inherit ONNX Runtime's thread pools from this process.
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=load_models, initargs=init_args)
        results = pool.map(fn, items)
    try:
        for i, r in enumerate(results, 1):
            elapsed = time.monotonic() - t0
            if i == n or i % max(1, min(10, n // 20 or 1)) == 0 or i <= 2:
                eta = elapsed / i * (n - i)
                log.info(
                    "%s: %d/%d series, %.0f s, %.1f s/series wall, about %.0f s left",
                    what,
                    i,
                    n,
                    elapsed,
                    elapsed / i,
                    eta,
                )
            yield r
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def data_hash(groups: list[dicom_series.SeriesFiles]) -> str:
    """First 16 hex digits of the SHA-256 of the sorted SeriesInstanceUIDs and SOPInstanceUIDs used."""
    h = hashlib.sha256()
    for g in sorted(groups, key=lambda g: g.series_instance_uid):
        h.update(g.series_instance_uid.encode())
        for inst in sorted(i.sop_instance_uid for i in g.instances):
            h.update(inst.encode())
    return h.hexdigest()[:16]


def run(args: argparse.Namespace) -> int:
    from service.gate import calibrate, write_gate

    if not args.data.is_dir():
        raise UsageError(f"--data {args.data}: no such folder")
    if not 0 < args.false_flag_rate < 0.5:
        raise UsageError(f"--false-flag-rate must be in (0, 0.5), got {args.false_flag_rate}")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    for flag, value in (("--population-report", args.population_report), ("--population-site", args.population_site)):
        if value is not None and not value.strip():
            raise UsageError(f"{flag} must not be empty")
    groups = normal_series(args.data, args.split)
    detector_dir = str(args.detector or DEFAULT_DETECTOR_DIR)
    try:
        load_models(str(args.segmenter) if args.segmenter else None, detector_dir)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise UsageError(f"model: {exc}") from None
    segmenter, detector, _ = models()
    log.info("calibrating the gate on %d normal series (%s) with %d process(es)", len(groups), args.split, args.jobs)
    t0 = time.monotonic()
    observations, used, seconds = [], [], []
    if args.observations is not None and args.observations.is_file():
        with open(args.observations, "rb") as f:
            cached = pickle.load(f)  # noqa: S301 — a cache this command wrote
        by_uid = {g.series_instance_uid: g for g in groups}
        for uid, obs, sec in cached:
            if uid in by_uid:
                observations.append(obs)
                used.append(by_uid[uid])
                seconds.append(sec)
        log.info("reused %d measurements from %s", len(observations), args.observations)
    else:
        init = (str(args.segmenter) if args.segmenter else None, detector_dir)
        for g, (uid, obs, sec, error) in zip(
            groups, map_with_progress(_observe_one, groups, args.jobs, init, "calibrate gate")
        ):
            if obs is None:
                log.warning("skipping series %s: %s", uid, error)
                continue
            observations.append(obs)
            used.append(g)
            seconds.append(sec)
        if args.observations is not None:
            with open(args.observations, "wb") as f:
                pickle.dump([(g.series_instance_uid, o, s) for g, o, s in zip(used, observations, seconds)], f)
    try:
        config, reference = calibrate(observations, false_flag_rate=args.false_flag_rate)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    config["segmenter"] = {"version": segmenter.version, "name": segmenter.name}
    config["detector"] = (
        {"version": str(detector.version), "threshold": float(detector.threshold)} if detector is not None else None
    )
    data = {
        "folder": str(args.data),
        "split": args.split,
        "series": len(used),
        "hash": data_hash(used),
        "calibrated_on_series": sorted(g.series_instance_uid for g in used),
        "seconds_per_series": round(sum(seconds) / max(len(seconds), 1), 2),
    }
    command = "gatekeeper calibrate gate " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    population = population_of(args.data, used, report=args.population_report, site=args.population_site)
    path = write_gate(args.out, config, reference, command=command, data=data, population=population)
    fusion = config["fusion"]
    print(
        f"gate calibrated on {len(used)} normal series in {time.monotonic() - t0:.0f} s: "
        f"{fusion['signals']} signals, fused cut {fusion['threshold']:.2f} "
        f"(Bonferroni {fusion['bonferroni_threshold']:.2f}, empirical {fusion['empirical_threshold']:.2f}; "
        f"leave-one-out false flags {100 * fusion['loo_false_flag_rate']:.0f} %) → {path}"
    )
    return 0
