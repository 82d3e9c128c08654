"""Stage 3 — measure the series (per-series cache) and calibrate the gate on the gate-calibration normals.

Every series is measured by the processes of `service.commands.gate` (models loaded once per
process): the active segmenter with the gate's test-time views and the site's new detector. Each
result is pickled to `cache/<stage>-<models>/<series uid>.pkl` as soon as it exists, so a stopped
run measures only what is missing; the folder name carries the models' versions, so a result is
never reused with other models.

The gate is fitted by `service.gate.calibrate` (leave-one-series-out centres and scales, the fused
cut at the false-flag rate) on the `gate_calibration` role only, and its gate.json lists those
series (`data.calibrated_on_series`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import pickle
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from service import dicom_series
from service.commands.gate import data_hash, evidence_of, map_with_progress, models
from service.errors import UsageError

log = logging.getLogger(__name__)

T = TypeVar("T")


def cache_folder(root: Path, stage: str, versions: Sequence[str]) -> Path:
    """`root/cache/<stage>-<first 12 hex digits of the models' versions' hash>`."""
    key = hashlib.sha256("|".join(versions).encode()).hexdigest()[:12]
    folder = root / "cache" / f"{stage}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cached_map(
    fn: Callable[[Any], tuple[str, T]],
    items: list[Any],
    uid_of: Callable[[Any], str],
    *,
    folder: Path,
    jobs: int,
    init_args: tuple[Any, ...],
    what: str,
    progress: bool,
) -> Iterator[tuple[str, T]]:
    """(uid, result) of `fn` for every item: from `folder/<uid>.pkl` when there, else computed in `jobs`
    processes (`map_with_progress`) and written there at once; with a progress bar."""
    from tqdm import tqdm

    todo = [it for it in items if not (folder / f"{uid_of(it)}.pkl").is_file()]
    if len(todo) < len(items):
        log.info("%s: %d of %d series from the cache", what, len(items) - len(todo), len(items))
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=what, unit="series", disable=not progress)
    try:
        if todo:
            for uid, result in map_with_progress(fn, todo, jobs, init_args, what):
                tmp = folder / f"{uid}.tmp"
                with open(tmp, "wb") as f:
                    pickle.dump(result, f)
                tmp.replace(folder / f"{uid}.pkl")
                bar.update(1)
    finally:
        bar.close()
    for it in items:
        uid = uid_of(it)
        with open(folder / f"{uid}.pkl", "rb") as f:
            yield uid, pickle.load(f)  # noqa: S301 — a cache this command wrote


def observe_one(files: dicom_series.SeriesFiles) -> tuple[str, Any]:
    """(uid, the gate's `Observation` of the series, or the reason it cannot be read) in a worker process."""
    from service.gate import DEFAULT_VIEWS, observe

    segmenter, detector, _ = models()
    try:
        series = dicom_series.load_series(files)
    except dicom_series.SeriesError as exc:
        return files.series_instance_uid, str(exc)
    _, obs, _ = observe(series=series, segmenter=segmenter, detector=evidence_of(detector, series), views=DEFAULT_VIEWS)
    return files.series_instance_uid, obs


def calibrate_gate(
    *,
    out: Path,
    root: Path,
    groups: list[dicom_series.SeriesFiles],
    segmenter_dir: Path,
    detector_dir: Path,
    false_flag_rate: float,
    jobs: int,
    progress: bool,
) -> tuple[Path, list[str]]:
    """Measure `groups` and write the site's gate (gate.json, reference) to `out`; return (its folder, the
    series it was calibrated on). Skipped when `out/gate.json` exists.

    Raises:
        UsageError: fewer than 5 usable normals with a liver (the calibration's message).
    """
    from service.gate import calibrate, write_gate
    from service.segmentation import Segmenter

    gate_json = out / "gate.json"
    if gate_json.is_file():
        import json

        listed = json.loads(gate_json.read_text()).get("data", {}).get("calibrated_on_series")
        log.info("gate: %s exists; calibration skipped", gate_json)
        return out, list(listed or [])
    from service.inference import load_detector

    segmenter, detector = Segmenter(segmenter_dir), load_detector(detector_dir)
    folder = cache_folder(root, "observe", [segmenter.version, str(detector.version)])
    t0 = time.monotonic()
    used, observations = [], []
    by_uid = {g.series_instance_uid: g for g in groups}
    init = (str(segmenter_dir), str(detector_dir))
    results = cached_map(
        observe_one,
        groups,
        lambda g: g.series_instance_uid,
        folder=folder,
        jobs=jobs,
        init_args=init,
        what="gate calibration",
        progress=progress,
    )
    for uid, obs in results:
        if isinstance(obs, str):
            log.warning("gate calibration: skipping series %s: %s", uid, obs)
            continue
        used.append(by_uid[uid])
        observations.append(obs)
    try:
        config, reference = calibrate(observations, false_flag_rate=false_flag_rate)
    except ValueError as exc:
        raise UsageError(f"gate calibration: {exc}") from None
    config["segmenter"] = {"version": segmenter.version, "name": segmenter.name}
    config["detector"] = {"version": str(detector.version), "threshold": float(detector.threshold)}
    calibrated_on = sorted(g.series_instance_uid for g in used)
    data = {
        "folder": "gatekeeper commission (gate_calibration role)",
        "split": "gate_calibration",
        "series": len(used),
        "hash": data_hash(used),
        "calibrated_on_series": calibrated_on,
        "seconds": round(time.monotonic() - t0, 1),
    }
    command = "gatekeeper " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    population = {
        "kind": "site",
        "series": len(used),
        "date": dt.date.today().isoformat(),
        "report": str((root / "report.html").resolve()),
    }
    write_gate(out, config, reference, command=command, data=data, population=population)
    return out, calibrated_on
