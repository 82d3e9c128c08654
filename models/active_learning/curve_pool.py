"""The phantom data of the label-efficiency experiment (`curve.py`): planned, rendered in memory, scored once.

Three sets, every series its own synthetic patient, seeds disjoint from every other phantom set
(training [0, 1e6), clinic mix [1e6, 2e6), candidate held-out [2e6, 3e6), synth recipe [3e6, …)):

- `pool`: the unlabeled pool, the clinic-like mix (`service.phantom.generate.clinic_plan`: ~15 %
  anomalous over every type with graded severities subtle / moderate / gross, a few chest-only,
  pelvis-only and partly covered scans, the rest normal), patients from `POOL_SEED_BASE`;
- `test`: held-out, `per_type` series of every anomaly type (grades in turn) and `2 · per_type`
  normals, patients from `TEST_SEED_BASE`;
- `replay`: a few normal series replayed during every fine-tune (so that a fine-tune on failures
  alone does not forget normals) and the validation the fine-tune's loop needs, from `REPLAY_SEED_BASE`.

Each series is rendered once (`service.phantom` scanner, in memory, never written as DICOM), run
through the serving code — the detector (`service.inference`), the shipped gate with the segmenter
(`service.gate`: fused evidence and the segmenter's entropy) and the detector encoder's embedding
(`service.suggest.SeriesEmbedder`) — and kept under `DIR/series/<set>/<name>.npz` at the
segmenter's working resolution (windowed field and ground-truth liver), with its scores in
`<name>.json`. A series already there is not rendered again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.phantom.anomalies import ANOMALY_TYPES, SEVERITY_GRADES
from service.phantom.generate import DEFAULT_NOISE_SIGMA, SeriesSpec, clinic_plan

log = logging.getLogger(__name__)

POOL_SEED_BASE = 4_000_000
TEST_SEED_BASE = 4_500_000
REPLAY_SEED_BASE = 4_800_000
#: Normal series replayed in every fine-tune, and how many of them the fine-tune's loop validates on.
REPLAY_SERIES = 6
REPLAY_VALIDATION = 2


@dataclass(frozen=True)
class PlannedSeries:
    """One series of the experiment: its set, name, type ("normal", an anomaly type, an off-target range)."""

    set: str
    name: str
    label: str
    grade: str | None
    spec: SeriesSpec


def _seeds(base: int, n: int, salt: int) -> np.ndarray:
    rng = np.random.default_rng([base, salt])
    return base + rng.choice(400_000, size=(n, 2), replace=False)


def _spec(
    *,
    seeds: np.ndarray,
    anomaly: str | None,
    grade: str | None,
    scan_range: str | None,
    matrix: int,
    slices: int | None,
) -> SeriesSpec:
    """A clinic-like spec, or (with `slices`) a short seed-protocol one for the quick run."""
    return SeriesSpec(
        folder="",
        patient_seed=int(seeds[0]),
        series_seed=int(seeds[1]),
        anomaly=anomaly,
        num_slices=slices,
        matrix=matrix,
        noise_sigma=DEFAULT_NOISE_SIGMA,
        grade=grade if anomaly is not None else None,
        scan_range=None if slices is not None else scan_range,
    )


def plan_pool(n: int, *, matrix: int, slices: int | None = None) -> list[PlannedSeries]:
    """The unlabeled pool: `n` series of the clinic-like mix (shuffled with a fixed seed).

    Raises:
        ValueError: `n` too small to hold one series of each kind (`clinic_plan`).
    """
    plan = [p for p in clinic_plan(n) if p[0] == "test"]
    order = np.random.default_rng([POOL_SEED_BASE, 1]).permutation(len(plan))
    seeds = _seeds(POOL_SEED_BASE, len(plan), 2)
    out = []
    for i, j in enumerate(order):
        _, anomaly, grade, off_target = plan[j]
        if slices is not None and off_target is not None:
            continue  # the quick run's short series have no planned scan range
        label = anomaly or off_target or "normal"
        scan_range = off_target or ("abdomen_pelvis" if anomaly == "hip_prosthesis" or i % 3 == 0 else "abdomen")
        spec = _spec(seeds=seeds[i], anomaly=anomaly, grade=grade, scan_range=scan_range, matrix=matrix, slices=slices)
        out.append(PlannedSeries("pool", f"{i:04d}_{label}", label, grade, spec))
    return out


def plan_test(
    per_type: int, *, matrix: int, slices: int | None = None, types: tuple[str, ...] = ANOMALY_TYPES
) -> list[PlannedSeries]:
    """The held-out set: `per_type` series of each anomaly type (grades in turn) and 2 · `per_type` normals."""
    kinds: list[tuple[str, str | None]] = [
        (t, SEVERITY_GRADES[g % len(SEVERITY_GRADES)]) for t in types for g in range(per_type)
    ]
    kinds += [("normal", None)] * (2 * per_type)
    seeds = _seeds(TEST_SEED_BASE, len(kinds), 3)
    out = []
    for i, (label, grade) in enumerate(kinds):
        anomaly = None if label == "normal" else label
        scan_range = "abdomen_pelvis" if anomaly == "hip_prosthesis" else "abdomen"
        spec = _spec(seeds=seeds[i], anomaly=anomaly, grade=grade, scan_range=scan_range, matrix=matrix, slices=slices)
        out.append(PlannedSeries("test", f"{i:03d}_{label}", label, grade, spec))
    return out


def plan_replay(n: int = REPLAY_SERIES, *, matrix: int, slices: int | None = None) -> list[PlannedSeries]:
    """Normal series replayed during every fine-tune (the first `REPLAY_VALIDATION` validate it)."""
    seeds = _seeds(REPLAY_SEED_BASE, n, 4)
    return [
        PlannedSeries(
            "replay",
            f"{i:02d}_normal",
            "normal",
            None,
            _spec(seeds=seeds[i], anomaly=None, grade=None, scan_range="abdomen", matrix=matrix, slices=slices),
        )
        for i in range(n)
    ]


# --- rendering and scoring (one worker process each; models loaded once per process) ------------------

_MODELS: dict[str, Any] = {}


def _models(model_dirs: dict[str, str]) -> dict[str, Any]:
    if not _MODELS:
        from service.gate import Gate
        from service.inference import load_detector
        from service.segmentation import Segmenter
        from service.suggest import SeriesEmbedder

        providers = ["CPUExecutionProvider"]
        segmenter = Segmenter(model_dirs["segmenter"], providers=providers)
        _MODELS.update(
            segmenter=segmenter,
            detector=load_detector(model_dirs["detector"]),
            gate=Gate.load(model_dirs["gate"]),
            embedder=SeriesEmbedder(detector_dir=Path(model_dirs["detector"]), segmenter=segmenter),
        )
    return _MODELS


def render(spec: SeriesSpec) -> tuple[Any, np.ndarray]:
    """(the series as the serving code reads it, `CTSeries` in HU; its ground-truth liver, bool [k, R, C])."""
    from service.dicom_series import CTSeries
    from service.phantom.canvas import Label
    from service.phantom.generate import plan_series
    from service.phantom.scanner import RESCALE_INTERCEPT, Scanner

    patient, anomaly, geometry = plan_series(spec)
    scanner = Scanner(patient, geometry, anomaly, noise_sigma=spec.noise_sigma, seed=spec.series_seed)
    k = geometry.num_slices
    hu = np.empty((k, geometry.rows, geometry.columns), np.float32)
    liver = np.zeros(hu.shape, bool)
    for i in range(k):
        stored, label, _ = scanner.acquire(i)
        hu[i] = stored.astype(np.float32) + RESCALE_INTERCEPT
        liver[i] = label == Label.LIVER
    series = CTSeries(
        series_instance_uid=f"2.25.{spec.patient_seed}{spec.series_seed}",
        sop_instance_uids=tuple(f"2.25.{spec.patient_seed}{spec.series_seed}.{i + 1}" for i in range(k)),
        hu=hu,
        locations_mm=np.asarray(geometry.z_positions, np.float64),
        pixel_spacing_mm=(geometry.pixel_spacing, geometry.pixel_spacing),
        folder=Path("."),
    )
    return series, liver


def _score_one(job: tuple[PlannedSeries, str, dict[str, str], bool]) -> dict[str, Any]:
    """Render, score and keep one series; return its scores (the JSON written next to its npz)."""
    from service.gate import DetectorEvidence
    from service.segmentation import frame_series, prepare_volume

    planned, folder, model_dirs, with_scores = job
    t0 = time.monotonic()
    models = _models(model_dirs)
    series, liver = render(planned.spec)
    scores: dict[str, Any] = {
        "name": planned.name,
        "set": planned.set,
        "label": planned.label,
        "grade": planned.grade,
        "series_instance_uid": series.series_instance_uid,
        "num_slices": series.num_slices,
        "spec": asdict(planned.spec),
    }
    if with_scores:
        verdict = models["detector"].score_series(series)
        evidence = DetectorEvidence(
            score=verdict.score,
            threshold=verdict.threshold,
            slice_scores=tuple(s.score for s in verdict.slices),
            model_version=models["detector"].version,
        )
        decision = models["gate"].assess(series=series, segmenter=models["segmenter"], detector=evidence)
        scores.update(
            detector_score=float(verdict.score),
            detector_threshold=float(verdict.threshold),
            gate_fused=decision.decision.fused,
            gate_fused_threshold=decision.decision.fused_threshold,
            gate_manual=decision.decision.manual,
            entropy=float(decision.segmentation.entropy),
            embedding=models["embedder"].embed(series).round(5).tolist(),
        )
    spec = models["segmenter"].input
    framing = frame_series(series.hu, series.pixel_spacing_mm, spec)
    path = Path(folder) / f"{planned.name}.npz"
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(
        tmp,
        volume=prepare_volume(series.hu, spec, framing).astype(np.float16),
        liver=framing.mask_to_field(liver),
    )
    tmp.replace(path)
    scores["seconds"] = round(time.monotonic() - t0, 2)
    path.with_suffix(".json").write_text(json.dumps(scores) + "\n")
    return scores


def _worker_init() -> None:
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"


def materialise(
    planned: list[PlannedSeries], *, out: Path, model_dirs: dict[str, str], jobs: int, with_scores: bool
) -> list[dict[str, Any]]:
    """Every planned series rendered, scored (`with_scores`) and kept under `out`; those already there are read."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [p for p in planned if not (out / f"{p.name}.json").is_file()]
    if todo:
        log.info("%s: rendering and scoring %d of %d series (%d jobs)", out.name, len(todo), len(planned), jobs)
        jobs_args = [(p, str(out), model_dirs, with_scores) for p in todo]
        if jobs <= 1:
            for n, job in enumerate(jobs_args, 1):
                _score_one(job)
                log.info("%s: %d / %d series", out.name, n, len(todo))
        else:
            with ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init) as pool:
                for n, _ in enumerate(pool.map(_score_one, jobs_args), 1):
                    log.info("%s: %d / %d series", out.name, n, len(todo))
    return [json.loads((out / f"{p.name}.json").read_text()) for p in planned]


def load_arrays(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(windowed field float16 [k, S, S], liver bool [k, S, S]) of a kept series."""
    with np.load(folder / f"{name}.npz") as data:
        return data["volume"], data["liver"].astype(bool)
