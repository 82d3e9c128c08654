"""Generate synthetic CT series to disk: one folder per series, one manifest per run.

Layout of a run::

    OUT/manifest.json
    OUT/<split>/<NNNN>_<label>/CT000001.dcm …       one CT Image file per slice
    OUT/<split>/<NNNN>_<label>/ground_truth/organs.seg.dcm
    OUT/<split>/<NNNN>_<label>/ground_truth/anomaly.seg.dcm   (anomalous series only)

(<label>: the anomaly type, "normal", or for the clinic mix's off-target series the scan range
"chest", "pelvis" or "liver_partial".)
(`<split>/` is absent for a plain `gatekeeper phantom` run.) The manifest records, per series, the
UIDs, the synthetic patient's seed, the anomaly and the slice indices (0 = the head-most slice,
InstanceNumber − 1) where its mask is non-empty, and the geometry. Per series also:

- `category`: "normal", "anomaly" (`anomaly` names its type, slices, `params` and `severity`:
  a grade "subtle" / "moderate" / "gross" and the drawn parameters, see `anomalies`), or
  "off_target": a normal series whose field of view does not hold the whole liver, so the liver
  model does not apply (`scan_range.kind` says which: "chest", "pelvis", "liver_partial");
- `scan_range`: `kind` ("abdomen", "abdomen_pelvis", "chest", "pelvis", "liver_partial"; read off
  the ground truth for the seed protocol's series, as planned for the clinic mix — the two agree),
  `liver` ("complete", "partial": liver on the first or last slice, "absent") and the anatomical
  positions of the first and last slice;
- `liver_slices` and `organs_seg`: the liver's ground truth (label `labels.liver` in the SEG).

The clinic mix (`clinic_specs`, `gatekeeper phantom dataset --clinic`): a `validation` split of
normal series (to calibrate a gate on, nothing else) and a `test` split of unseen patients:
~15 % anomalous (evenly over the types, grades in turn), ~1.4 % each of chest-only, pelvis-only
and partly covered livers, the rest normal; patient seeds from [1e6, 2e6), disjoint from the seed
protocol's [0, 1e6).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.phantom.anatomy import Patient
from service.phantom.anomalies import ANOMALY_TYPES, SEVERITY_GRADES, Anomaly, make_anomaly
from service.phantom.canvas import Label
from service.phantom.dicom import SeriesIdentity, anomaly_segmentation, ct_datasets, organ_segmentation, write_ct_slice
from service.phantom.scanner import (
    OFF_TARGET_RANGES,
    SCAN_RANGES,
    ScanGeometry,
    Scanner,
    plan_clinic_geometry,
    plan_geometry,
)
from service.phantom.sites import DEFAULT_SITE, SITES, SiteProfile, site_profile

log = logging.getLogger(__name__)

#: 2: adds `category`, `scan_range` and `anomaly.severity` (version 1's fields unchanged).
MANIFEST_VERSION = 2
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
    #: Severity grade to draw the anomaly's parameters in; None: the seed protocol's fixed draw.
    grade: str | None = None
    #: Clinic scan range (`scanner.SCAN_RANGES`); None: the seed protocol's scan planning.
    scan_range: str | None = None
    #: Site profile (`sites.SITES`) whose protocol acquires a clinic series.
    site: str = DEFAULT_SITE.name
    #: Contrast phase of a series without an anomaly ("portal_venous" or "non_contrast").
    phase: str = "portal_venous"

    def __post_init__(self) -> None:
        if self.anomaly is not None and self.anomaly not in ANOMALY_TYPES:
            raise ValueError(f"anomaly must be one of {', '.join(ANOMALY_TYPES)} or None, got {self.anomaly!r}.")
        if self.grade is not None and (self.grade not in SEVERITY_GRADES or self.anomaly is None):
            raise ValueError(
                f"grade must be one of {', '.join(SEVERITY_GRADES)} for an anomalous series, got {self.grade!r} "
                f"with anomaly {self.anomaly!r}."
            )
        if self.scan_range is not None:
            if self.scan_range not in SCAN_RANGES:
                raise ValueError(
                    f"scan_range must be one of {', '.join(SCAN_RANGES)} or None, got {self.scan_range!r}."
                )
            if self.scan_range in OFF_TARGET_RANGES and self.anomaly is not None:
                raise ValueError(
                    f"an off-target scan range ({self.scan_range}) carries no anomaly, got {self.anomaly!r}."
                )
            if self.num_slices is not None:
                raise ValueError("num_slices does not apply to a clinic scan range; it sets its own length.")
        if self.num_slices is not None and self.num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {self.num_slices}.")
        if self.matrix < 32:
            raise ValueError(f"matrix must be >= 32, got {self.matrix}.")
        if not self.noise_sigma >= 0:
            raise ValueError(f"noise_sigma must be >= 0 HU, got {self.noise_sigma}.")
        if self.site not in SITES:
            raise ValueError(f"site must be one of {', '.join(SITES)}, got {self.site!r}.")
        if self.site != DEFAULT_SITE.name and self.scan_range is None:
            raise ValueError(f"site {self.site!r} applies to a clinic scan range only (scan_range is None).")
        if self.phase not in ("portal_venous", "non_contrast"):
            raise ValueError(f"phase must be 'portal_venous' or 'non_contrast', got {self.phase!r}.")
        if self.phase != "portal_venous" and self.anomaly is not None:
            raise ValueError(f"phase applies to a series without an anomaly; {self.anomaly!r} brings its own.")


def plan_series(spec: SeriesSpec) -> tuple[Patient, Anomaly | None, ScanGeometry]:
    """The patient, anomaly and scan geometry of a spec, without rendering (seeded: same every time)."""
    patient = Patient(spec.patient_seed)
    rng = np.random.default_rng([spec.series_seed, 0x5E])
    anomaly = make_anomaly(spec.anomaly, patient, rng, grade=spec.grade)
    if spec.scan_range is None:
        geometry = plan_geometry(patient, rng, num_slices=spec.num_slices, matrix=spec.matrix, anomaly=anomaly)
    else:
        geometry = plan_clinic_geometry(
            patient, rng, kind=spec.scan_range, matrix=spec.matrix, anomaly=anomaly, site=site_profile(spec.site)
        )
    return patient, anomaly, geometry


def scan_range_of(patient: Patient, geometry: ScanGeometry, liver_slices: list[int]) -> dict[str, Any]:
    """What the scan covers, read off the ground truth: `kind` and whether the liver is whole.

    kind: "chest" / "pelvis" (no liver, above / below it), "liver_partial" (liver on the first or
    last slice: the scan cuts through it), else "abdomen_pelvis" when the scan reaches the
    femoral heads, otherwise "abdomen".
    """
    k = geometry.num_slices
    u_first, u_last = geometry.u_positions[0], geometry.u_positions[-1]
    if not liver_slices:
        liver = "absent"
        kind = "chest" if u_last < patient.u_dome_right else "pelvis"
    elif liver_slices[0] == 0 or liver_slices[-1] == k - 1:
        liver, kind = "partial", "liver_partial"
    else:
        liver = "complete"
        kind = "abdomen_pelvis" if u_last >= patient.u_femoral_head else "abdomen"
    return {"kind": kind, "liver": liver, "u_first": round(u_first, 4), "u_last": round(u_last, 4)}


#: Series description per clinic scan range (the seed protocol's series are all abdominal).
_DESCRIPTION_REGION = {"chest": "CHEST", "pelvis": "PELVIS"}


def generate_series(spec: SeriesSpec, out: Path, on_slice: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write one series under `out / spec.folder`; return its manifest entry.

    Raises:
        RuntimeError: the anomaly left no mark, or a clinic series' scan range is not the one
            planned (a bug in the planning; report the seed).
    """
    patient, anomaly, geometry = plan_series(spec)
    site = site_profile(spec.site)
    scanner = Scanner(
        patient, geometry, anomaly, noise_sigma=spec.noise_sigma, seed=spec.series_seed, site=site, phase=spec.phase
    )
    identity = SeriesIdentity(patient_seed=spec.patient_seed, series_seed=spec.series_seed)
    phase = anomaly.phase_label if anomaly is not None else spec.phase
    region = _DESCRIPTION_REGION.get(spec.scan_range or "", "ABDOMEN")
    description = f"{region} NC 3D" if phase == "non_contrast" else f"{region} PV 3D"
    datasets = ct_datasets(identity, geometry, series_description=description)
    if site is not DEFAULT_SITE:
        for ds in datasets:
            ds.ConvolutionKernel = site.convolution_kernel

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
    scan_range = scan_range_of(patient, geometry, liver_slices)
    if spec.scan_range is not None and scan_range["kind"] != spec.scan_range:
        raise RuntimeError(
            f"series {spec.folder} was planned as a {spec.scan_range} scan but covers {scan_range['kind']}; "
            "report this seed."
        )
    category = "anomaly" if anomaly is not None else ("normal" if scan_range["liver"] == "complete" else "off_target")
    # The default site's entries stay as they were before sites existed (no "site" key).
    site_entry = {} if site is DEFAULT_SITE else {"site": _site_entry(site)}
    return {
        "folder": spec.folder,
        "split": spec.split,
        "category": category,
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
            "severity": anomaly.severity,
            "seg": "ground_truth/anomaly.seg.dcm",
        },
        "scan_range": scan_range,
        "organs_seg": "ground_truth/organs.seg.dcm",
        "liver_slices": liver_slices,
        "contrast_phase": phase,
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
        **site_entry,
    }


def _site_entry(site: SiteProfile) -> dict[str, Any]:
    """What a non-default site changed, for the manifest entry of each of its series."""
    return {
        "name": site.name,
        "convolution_kernel": site.convolution_kernel,
        "noise_factor": site.noise_factor,
        "in_plane_blur_mm": site.in_plane_blur_mm,
    }


def count_slices(spec: SeriesSpec) -> int:
    """How many slices a spec will produce, without rendering (for the progress bar)."""
    return plan_series(spec)[2].num_slices


#: Environment of the clinic mix's worker processes: one BLAS thread each. Every slice evaluates
#: smooth fields with small matrix products; with more BLAS threads than free cores they wait on
#: each other and run up to 50× slower. (The thread count also moves a few pixels in a million at
#: tissue boundaries, so it is fixed for reproducible output.)
WORKER_ENVIRONMENT = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextmanager
def _worker_environment() -> Iterator[None]:
    """Start worker processes (spawned: fresh interpreters) with `WORKER_ENVIRONMENT`."""
    saved = {key: os.environ.get(key) for key in WORKER_ENVIRONMENT}
    os.environ.update(WORKER_ENVIRONMENT)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_one(args: tuple[SeriesSpec, str]) -> dict[str, Any]:
    spec, out = args
    return generate_series(spec, Path(out))


def generate_run(
    specs: list[SeriesSpec], out: Path, *, jobs: int = 1, progress: bool = True, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Generate every series in `specs` under `out` and write `out/manifest.json`; return it.

    Clinic series (a `scan_range`) are always rendered in spawned worker processes with one BLAS
    thread (`WORKER_ENVIRONMENT`), even with `jobs` 1: their pixels then do not depend on the
    machine's core count or on `jobs`, and a loaded machine does not slow them 50-fold. The seed
    protocol's series are rendered as they always were (in this process, or forked workers with
    the default BLAS threads), because a different BLAS thread count moves a few boundary pixels.
    """
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    # Marks the folder as ours from the start, so --force may clear even an interrupted run.
    (out / RUN_MARKER).write_text("gatekeeper phantom run\n")
    counts = {s.folder: count_slices(s) for s in specs}
    total = sum(counts.values())
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
        clinic = any(s.scan_range is not None for s in specs)
        if jobs <= 1 and not clinic:
            for spec in specs:
                entries.append(generate_series(spec, out, on_slice=lambda: bar.update(1)))
        else:
            context = multiprocessing.get_context("spawn" if clinic else "fork")
            with (
                _worker_environment() if clinic else nullcontext(),
                ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=context) as pool,
            ):
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


#: The clinic mix: test series per split size, fractions of the test split (see `clinic_specs`).
CLINIC_TEST_SERIES = 500
CLINIC_VALIDATION_FRACTION = 0.12  # 60 normal validation series for 500 test series
CLINIC_ANOMALOUS_FRACTION = 0.15
CLINIC_OFF_TARGET_FRACTION = 0.014  # of each off-target scan range
#: Share of normal (and most anomalous) clinic series scanned down through the pelvis.
CLINIC_PELVIS_SHARE = 0.35
#: Clinic patient and series seeds come from [1e6, 2e6) at the default site (other sites: their
#: `seed_offset`, 2e6 and up): the seed protocol uses [0, 1e6).
CLINIC_SEED_OFFSET = DEFAULT_SITE.seed_offset
#: How many seeds each site draws its patients and series from.
SITE_SEED_RANGE = 1_000_000


def clinic_plan(
    test_series: int, validation_series: int | None = None
) -> list[tuple[str, str | None, str | None, str | None]]:
    """(split, anomaly, grade, off-target scan range) of every series of a clinic mix, unshuffled.

    `test_series` test series: round(15 %) anomalous, spread as evenly as counts allow over the
    anomaly types, each type's series graded subtle, moderate, gross in turn; max(1, round(1.4 %))
    each of chest-only, pelvis-only and partly covered livers; the rest normal. Plus
    `validation_series` normal validation series (default: round(12 % of `test_series`), at least 2).

    Raises:
        ValueError: if `test_series` cannot hold one series of each kind, or `validation_series` < 2.
    """
    if validation_series is not None and validation_series < 2:
        raise ValueError(f"a clinic validation split needs at least 2 series, got {validation_series}.")
    n_off = max(1, round(CLINIC_OFF_TARGET_FRACTION * test_series))
    n_anomalous = max(len(ANOMALY_TYPES), round(CLINIC_ANOMALOUS_FRACTION * test_series))
    if test_series < n_anomalous + len(OFF_TARGET_RANGES) * n_off + 1:
        raise ValueError(
            f"a clinic test split needs at least {n_anomalous + len(OFF_TARGET_RANGES) * n_off + 1} series, "
            f"got {test_series}."
        )
    plan: list[tuple[str, str | None, str | None, str | None]] = []
    n_validation = validation_series or max(2, round(CLINIC_VALIDATION_FRACTION * test_series))
    plan += [("validation", None, None, None)] * n_validation
    per_type = [
        n_anomalous // len(ANOMALY_TYPES) + (i < n_anomalous % len(ANOMALY_TYPES)) for i in range(len(ANOMALY_TYPES))
    ]
    for name, n in zip(ANOMALY_TYPES, per_type):
        plan += [("test", name, SEVERITY_GRADES[j % len(SEVERITY_GRADES)], None) for j in range(n)]
    for kind in OFF_TARGET_RANGES:
        plan += [("test", None, None, kind)] * n_off
    plan += [("test", None, None, None)] * (test_series - n_anomalous - len(OFF_TARGET_RANGES) * n_off)
    return plan


def clinic_specs(
    *,
    seed: int,
    test_series: int = CLINIC_TEST_SERIES,
    validation_series: int | None = None,
    matrix: int,
    noise_sigma: float,
    site: SiteProfile = DEFAULT_SITE,
) -> list[SeriesSpec]:
    """The clinic-like mix, deterministic for a seed: unseen patients, mostly normal.

    Validation series (normal, abdominal ranges) are for calibrating a gate only; the test split
    is ~15 % anomalous with severities from subtle to gross, and a few series the liver model does
    not apply to (`scan_range` chest, pelvis, liver_partial). Normal and anomalous series get a
    realistic abdomen or abdomen-pelvis range (hip prostheses always the latter). Every series is
    its own synthetic patient, drawn from [1e6, 2e6): disjoint from `dataset_specs`' patients.
    The test split is shuffled, so the folder numbers say nothing about what is in them.

    `site` (`sites.SITES`) acquires the mix with its protocol and its own patients: seeds from
    [site.seed_offset, site.seed_offset + 1e6), disjoint from every other site's, and
    `site.non_contrast_share` of the series without an anomaly rendered without contrast. The
    default site's mix is the one this function always made. `validation_series` sets the size
    of the validation split (e.g. 96 normals to commission on); left out, the mix is unchanged.

    Raises:
        ValueError: if `test_series` is too small for the mix (see `clinic_plan`).
    """
    stream = [seed, 0xC11, test_series] + ([] if site is DEFAULT_SITE else [site.code])
    stream += [] if validation_series is None else [0x7A1, validation_series]
    rng = np.random.default_rng(stream)
    plan = clinic_plan(test_series, validation_series)
    n_validation = sum(1 for split, *_ in plan if split == "validation")
    order = np.concatenate([np.arange(n_validation), n_validation + rng.permutation(len(plan) - n_validation)])
    plan = [plan[i] for i in order]
    patient_seeds = site.seed_offset + rng.choice(SITE_SEED_RANGE, size=len(plan), replace=False)
    series_seeds = site.seed_offset + rng.choice(SITE_SEED_RANGE, size=len(plan), replace=False)
    pelvis = rng.uniform(size=len(plan)) < CLINIC_PELVIS_SHARE
    # Drawn last, so the draws above are the same as before sites existed.
    non_contrast = rng.uniform(size=len(plan)) < site.non_contrast_share
    specs = []
    counters: dict[str, int] = {}
    for (split, anomaly, grade, off_target), p, q, down, plain in zip(
        plan, patient_seeds, series_seeds, pelvis, non_contrast
    ):
        counters[split] = counters.get(split, 0) + 1
        if off_target is not None:
            scan_range, label = off_target, off_target
        else:
            scan_range = "abdomen_pelvis" if down or anomaly == "hip_prosthesis" else "abdomen"
            label = anomaly or "normal"
        specs.append(
            SeriesSpec(
                folder=f"{split}/{counters[split]:04d}_{label}",
                patient_seed=int(p),
                series_seed=int(q),
                anomaly=anomaly,
                matrix=matrix,
                noise_sigma=noise_sigma,
                split=split,
                grade=grade,
                scan_range=scan_range,
                site=site.name,
                phase="non_contrast" if plain and anomaly is None else "portal_venous",
            )
        )
    return specs


def spec_label(spec: SeriesSpec) -> str:
    """What a series is, in one word: its anomaly type, its off-target scan range, or "normal"."""
    if spec.anomaly is not None:
        return spec.anomaly
    if spec.scan_range in OFF_TARGET_RANGES:
        return str(spec.scan_range)
    return "normal"


def spec_summary(specs: Iterable[SeriesSpec]) -> dict[str, dict[str, int]]:
    """Counts per split and anomaly type (or off-target scan range), for the manifest and printout."""
    summary: dict[str, dict[str, int]] = {}
    for s in specs:
        split = summary.setdefault(s.split or "all", {})
        key = spec_label(s)
        split[key] = split.get(key, 0) + 1
    return summary


def severity_summary(specs: Iterable[SeriesSpec]) -> dict[str, dict[str, int]]:
    """Counts per anomaly type and severity grade of the graded (clinic) series."""
    summary: dict[str, dict[str, int]] = {}
    for s in specs:
        if s.anomaly is not None and s.grade is not None:
            by_grade = summary.setdefault(s.anomaly, {})
            by_grade[s.grade] = by_grade.get(s.grade, 0) + 1
    return summary


def spec_as_dict(spec: SeriesSpec) -> dict[str, Any]:
    return asdict(spec)
