"""Generate synthetic CT series to disk: one folder per series, one manifest per run.

Layout of a run::

    OUT/manifest.json
    OUT/<split>/<NNNN>_<anomaly or normal>/CT000001.dcm …       one CT Image file per slice
    OUT/<split>/<NNNN>_<anomaly or normal>/ground_truth/organs.seg.dcm
    OUT/<split>/<NNNN>_<anomaly or normal>/ground_truth/anomaly.seg.dcm   (anomalous series only)

(`<split>/` is absent for a plain `gatekeeper phantom` run.) The manifest records, per series, the
UIDs, the synthetic patient's seed, the anomaly and the slice indices (0 = the head-most slice,
InstanceNumber − 1) where its mask is non-empty, and the geometry.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.phantom.anatomy import Label, Patient
from service.phantom.anomalies import ANOMALY_TYPES, make_anomaly
from service.phantom.dicom import SeriesIdentity, anomaly_segmentation, ct_datasets, organ_segmentation, write_ct_slice
from service.phantom.scanner import Scanner, plan_geometry

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
RUN_MARKER = ".phantom-run"
DEFAULT_NOISE_SIGMA = 12.0


@dataclass(frozen=True)
class SeriesSpec:
    """What to generate for one series. Seeds fully determine the result."""

    folder: str  # relative to the run's output folder
    patient_seed: int
    series_seed: int
    anomaly: str | None = None
    num_slices: int | None = None  # None: a realistic scan range at the chosen slice thickness
    matrix: int = 512
    noise_sigma: float = DEFAULT_NOISE_SIGMA
    split: str | None = None

    def __post_init__(self) -> None:
        if self.anomaly is not None and self.anomaly not in ANOMALY_TYPES:
            raise ValueError(f"anomaly must be one of {', '.join(ANOMALY_TYPES)} or None, got {self.anomaly!r}.")
        if self.num_slices is not None and self.num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {self.num_slices}.")
        if self.matrix < 32:
            raise ValueError(f"matrix must be >= 32, got {self.matrix}.")
        if not self.noise_sigma >= 0:
            raise ValueError(f"noise_sigma must be >= 0 HU, got {self.noise_sigma}.")


def generate_series(spec: SeriesSpec, out: Path, on_slice: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write one series under `out / spec.folder`; return its manifest entry."""
    patient = Patient(spec.patient_seed)
    rng = np.random.default_rng([spec.series_seed, 0x5E])
    anomaly = make_anomaly(spec.anomaly, patient, rng)
    geometry = plan_geometry(patient, rng, num_slices=spec.num_slices, matrix=spec.matrix, anomaly=anomaly)
    scanner = Scanner(patient, geometry, anomaly, noise_sigma=spec.noise_sigma, seed=spec.series_seed)
    identity = SeriesIdentity(patient_seed=spec.patient_seed, series_seed=spec.series_seed)
    description = "ABDOMEN PV 3D" if anomaly is None or anomaly.phase == "portal_venous" else "ABDOMEN NC 3D"
    datasets = ct_datasets(identity, geometry, series_description=description)

    folder = out / spec.folder
    (folder / "ground_truth").mkdir(parents=True, exist_ok=True)
    k = geometry.num_slices
    labels = np.zeros((k, geometry.rows, geometry.columns), np.uint8)
    masks = np.zeros(labels.shape, bool) if anomaly is not None else None
    files = []
    for i, ds in enumerate(datasets):
        stored, label, mask = scanner.acquire(i)
        name = f"CT{i + 1:06d}.dcm"
        write_ct_slice(ds, stored, folder / name)
        files.append(name)
        labels[i] = label
        if mask is not None and masks is not None:
            masks[i] = mask
        if on_slice is not None:
            on_slice()

    organ_segmentation(datasets, labels, identity).save_as(folder / "ground_truth" / "organs.seg.dcm")
    affected: list[int] = []
    if anomaly is not None and masks is not None:
        affected = [int(i) for i in np.flatnonzero(masks.any(axis=(1, 2)))]
        if not affected:
            raise RuntimeError(f"anomaly {anomaly.name} left no mark on series {spec.folder}; report this seed.")
        anomaly_segmentation(datasets, masks, identity, anomaly.name).save_as(
            folder / "ground_truth" / "anomaly.seg.dcm"
        )
    liver_slices = [int(i) for i in np.flatnonzero((labels == Label.LIVER).any(axis=(1, 2)))]
    return {
        "folder": spec.folder,
        "split": spec.split,
        "series_instance_uid": identity.series_instance_uid,
        "study_instance_uid": identity.study_instance_uid,
        "frame_of_reference_uid": identity.frame_of_reference_uid,
        "patient_seed": spec.patient_seed,
        "series_seed": spec.series_seed,
        "anomaly": None
        if anomaly is None
        else {
            "type": anomaly.name,
            "slices": affected,
            "params": anomaly.params,
            "seg": "ground_truth/anomaly.seg.dcm",
        },
        "organs_seg": "ground_truth/organs.seg.dcm",
        "liver_slices": liver_slices,
        "contrast_phase": scanner.anomaly.phase if scanner.anomaly else "portal_venous",
        "noise_sigma_hu": round(scanner.noise_sigma, 2),
        "patient": {"size": round(patient.size, 3), "subcutaneous_fat_mm": round(patient.fat_mm, 1)},
        "geometry": {
            "num_slices": k,
            "rows": geometry.rows,
            "columns": geometry.columns,
            "pixel_spacing_mm": geometry.pixel_spacing,
            "slice_thickness_mm": geometry.slice_thickness,
            "spacing_between_slices_mm": geometry.spacing_between_slices,
            "z_first_mm": geometry.z_positions[0],
            "z_last_mm": geometry.z_positions[-1],
            "reconstruction_diameter_mm": round(2 * geometry.fov_radius, 1),
            "anatomical_position": [round(u, 4) for u in geometry.u_positions],
        },
        "files": files,
    }


def count_slices(spec: SeriesSpec) -> int:
    """How many slices a spec will produce, without rendering (for the progress bar)."""
    patient = Patient(spec.patient_seed)
    rng = np.random.default_rng([spec.series_seed, 0x5E])
    anomaly = make_anomaly(spec.anomaly, patient, rng)
    return plan_geometry(patient, rng, num_slices=spec.num_slices, matrix=spec.matrix, anomaly=anomaly).num_slices


def _run_one(args: tuple[SeriesSpec, str]) -> dict[str, Any]:
    spec, out = args
    return generate_series(spec, Path(out))


def generate_run(
    specs: list[SeriesSpec], out: Path, *, jobs: int = 1, progress: bool = True, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Generate every series in `specs` under `out` and write `out/manifest.json`; return it."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    # Marks the folder as ours from the start, so --force may clear even an interrupted run.
    (out / RUN_MARKER).write_text("gatekeeper phantom run\n")
    total = sum(count_slices(s) for s in specs)
    # On a terminal the bar redraws smoothly; in a log file, one line every 10 s is enough.
    interactive = sys.stderr.isatty()
    bar = tqdm(
        total=total,
        unit="slice",
        desc="phantom",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=0.1 if interactive else 10.0,
    )
    entries: list[dict[str, Any]] = []
    try:
        if jobs <= 1:
            for spec in specs:
                entries.append(generate_series(spec, out, on_slice=lambda: bar.update(1)))
        else:
            counts = {s.folder: count_slices(s) for s in specs}
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                for entry in pool.map(_run_one, [(s, str(out)) for s in specs]):
                    entries.append(entry)
                    bar.update(counts[entry["folder"]])
    finally:
        bar.close()
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "generator": "gatekeeper phantom",
        **(meta or {}),
        "anomaly_types": list(ANOMALY_TYPES),
        "labels": {label.name.lower(): int(label) for label in Label},
        "series": entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log.info("wrote %d series (%d slices) under %s", len(entries), total, out)
    return manifest


def series_specs(
    *, count: int, seed: int, num_slices: int | None, anomaly: str | None, matrix: int, noise_sigma: float
) -> list[SeriesSpec]:
    """Specs for `gatekeeper phantom`: `count` series of distinct synthetic patients."""
    rng = np.random.default_rng([seed, 0xA11])
    seeds = rng.choice(10**6, size=(count, 2), replace=False)
    label = anomaly or "normal"
    return [
        SeriesSpec(
            folder=f"{i + 1:04d}_{label}",
            patient_seed=int(p),
            series_seed=int(q),
            anomaly=anomaly,
            num_slices=num_slices,
            matrix=matrix,
            noise_sigma=noise_sigma,
        )
        for i, (p, q) in enumerate(seeds)
    ]


#: The seed protocol: (split, normal count, anomalous count per type) — see `dataset_specs`.
SEED_PROTOCOL = {"train": 96, "validation": 10, "test_normal": 25}
SEED_TEST_ANOMALIES = {
    "stent": 5,
    "tumor": 5,
    "fluid": 5,
    "hip_prosthesis": 3,
    "low_dose": 3,
    "contrast_phase": 2,
    "truncation": 2,
}
LARGE_TEST = {"normal": 125, **{name: 25 for name in ANOMALY_TYPES}}


def dataset_specs(
    *, seed: int, large: bool, num_slices: int | None, matrix: int, noise_sigma: float
) -> list[SeriesSpec]:
    """The seed protocol, deterministic for a seed, every synthetic patient in one split only.

    Standard: 96 normal training series, 10 normal validation series (for thresholds) and a
    50-series test set (25 normal, 25 anomalous spread over the anomaly types). `large` builds
    the ≥ 300-series test set for statistics instead (125 normal + 25 per anomaly type), from
    patients disjoint from the standard set's.
    """
    rng = np.random.default_rng([seed, 0xDA7A, 1 if large else 0])
    plan: list[tuple[str, str | None]] = []
    if large:
        for name, n in LARGE_TEST.items():
            plan += [("test_large", None if name == "normal" else name)] * n
    else:
        plan += [("train", None)] * SEED_PROTOCOL["train"]
        plan += [("validation", None)] * SEED_PROTOCOL["validation"]
        plan += [("test", None)] * SEED_PROTOCOL["test_normal"]
        for name, n in SEED_TEST_ANOMALIES.items():
            plan += [("test", name)] * n
    # Patient seeds: standard set draws from [0, 5e5), the large set from [5e5, 1e6): disjoint.
    offset = 500_000 if large else 0
    patient_seeds = offset + rng.choice(500_000, size=len(plan), replace=False)
    series_seeds = rng.choice(10**6, size=len(plan), replace=False)
    specs = []
    counters: dict[str, int] = {}
    for (split, anomaly), p, q in zip(plan, patient_seeds, series_seeds):
        counters[split] = counters.get(split, 0) + 1
        folder = f"{split}/{counters[split]:04d}_{anomaly or 'normal'}"
        specs.append(
            SeriesSpec(
                folder=folder,
                patient_seed=int(p),
                series_seed=int(q),
                anomaly=anomaly,
                num_slices=num_slices,
                matrix=matrix,
                noise_sigma=noise_sigma,
                split=split,
            )
        )
    return specs


def spec_summary(specs: Iterable[SeriesSpec]) -> dict[str, dict[str, int]]:
    """Counts per split and anomaly type, for the manifest and the command's printout."""
    summary: dict[str, dict[str, int]] = {}
    for s in specs:
        split = summary.setdefault(s.split or "all", {})
        key = s.anomaly or "normal"
        split[key] = split.get(key, 0) + 1
    return summary


def spec_as_dict(spec: SeriesSpec) -> dict[str, Any]:
    return asdict(spec)
