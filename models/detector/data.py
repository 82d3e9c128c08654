"""Training data for the detector: normal CT series from any DICOM folder tree, preprocessed once.

`--data DIR` is any folder tree of DICOM CT series (a PACS export of a hospital's own normal scans
or a phantom run). Series are grouped by SeriesInstanceUID and ordered by position whatever the
file names (`service.dicom_series`). Splits:

* if DIR holds a phantom `manifest.json` with `split` fields, its `train` and `validation` series
  are used and everything else (the test split, any anomalous series) is left out;
* otherwise every CT series counts as normal and a seeded 10 % (at least 2) is held out for
  validation (normalisation of the score terms and the threshold).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service import dicom_series, imaging

log = logging.getLogger(__name__)


@dataclass
class SeriesData:
    """One preprocessed series: images in [-1, 1] (float16 to halve memory) and body masks."""

    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    images: np.ndarray  # float16 [k, S, S]
    masks: np.ndarray  # bool [k, S, S]
    locations_mm: np.ndarray  # float64 [k], head → feet
    true_positions: np.ndarray | None = None  # phantom ground truth (manifest anatomical_position), if known
    folder: str = ""

    @property
    def num_slices(self) -> int:
        return int(self.images.shape[0])

    def naive_positions(self) -> np.ndarray:
        k = self.num_slices
        return np.linspace(0.0, 1.0, k, dtype=np.float32) if k > 1 else np.zeros(1, np.float32)


@dataclass
class PatchSeriesData(SeriesData):
    """A series for the patch recipe: the slice recipe's images (for body-part regression) plus the HU
    resampled to the patch geometry's field and the patches' places (`service.imaging`).

    `hu_field` is int16 (HU rounded to 1 HU: a quarter of float32's memory, below the CT noise);
    `centres` lists every body patch of the series as (slice, row, column) and `boxes` the body's
    bounding box (r0, r1, c0, c1) per slice, both in field pixels.
    """

    hu_field: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.int16))  # [k, F, F]
    centres: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int32))  # [P, 3]
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int32))  # [k, 4]


@dataclass
class Dataset:
    train: list[SeriesData]
    validation: list[SeriesData]
    source: str
    skipped: list[str] = field(default_factory=list)  # "series uid: problem" for every series left out

    def data_hash(self) -> str:
        """sha256 over the training and validation series' UIDs and preprocessed pixels (order-free)."""
        h = hashlib.sha256()
        for name, group in (("train", self.train), ("validation", self.validation)):
            for s in sorted(group, key=lambda s: s.series_instance_uid):
                h.update(f"{name}:{s.series_instance_uid}:{s.num_slices}".encode())
                h.update(np.ascontiguousarray(s.images).tobytes())
                if isinstance(s, PatchSeriesData):
                    h.update(np.ascontiguousarray(s.hu_field).tobytes())
        return h.hexdigest()


def _scan_chunk(paths: list[str]) -> list[dicom_series.Instance]:
    out = []
    for p in paths:
        inst = dicom_series._read_header(Path(p))  # noqa: SLF001 — same module family, shared helper
        if inst is not None:
            out.append(inst)
    return out


def scan_parallel(root: Path, jobs: int) -> list[dicom_series.SeriesFiles]:
    """`dicom_series.scan_tree`, with the header reads spread over `jobs` processes."""
    if jobs <= 1:
        return dicom_series.scan_tree(root)
    paths = [str(p) for p in dicom_series._walk_files(root)]  # noqa: SLF001
    chunks = [paths[i :: jobs * 4] for i in range(jobs * 4)]
    groups: dict[str, dicom_series.SeriesFiles] = {}
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for insts in pool.map(_scan_chunk, chunks):
            for inst in insts:
                groups.setdefault(
                    inst.series_instance_uid, dicom_series.SeriesFiles(inst.series_instance_uid)
                ).instances.append(inst)
    for g in groups.values():
        g.instances.sort(key=lambda i: str(i.path))
    return sorted(groups.values(), key=lambda g: str(g.folder))


def _load_one(args: tuple[dicom_series.SeriesFiles, int, imaging.PatchGeometry | None]) -> SeriesData | str:
    files, size, patch = args
    try:
        series = dicom_series.load_series(files)
    except dicom_series.SeriesError as exc:
        return str(exc)
    images, masks = imaging.preprocess_slices(series.hu, size)
    if patch is not None:
        fields, field_masks, boxes = imaging.preprocess_patch_series(series.hu, series.pixel_spacing_mm, patch)
        centres = [imaging.patch_centres(m, patch) for m in field_masks]
        index = np.concatenate([np.full((len(c), 1), i, np.int32) for i, c in enumerate(centres)])
        return PatchSeriesData(
            series.series_instance_uid,
            series.sop_instance_uids,
            images.astype(np.float16),
            masks,
            series.locations_mm,
            folder=str(series.folder),
            hu_field=np.clip(np.rint(fields), -32768, 32767).astype(np.int16),
            centres=np.concatenate([index, np.concatenate(centres)], axis=1).astype(np.int32),
            boxes=boxes,
        )
    return SeriesData(
        series.series_instance_uid,
        series.sop_instance_uids,
        images.astype(np.float16),
        masks,
        series.locations_mm,
        folder=str(series.folder),
    )


def _manifest_splits(root: Path) -> tuple[dict[str, str], dict[str, list[float]]] | None:
    path = root / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None
    splits, positions = {}, {}
    for entry in manifest.get("series", []):
        uid = entry.get("series_instance_uid")
        if not uid:
            continue
        split = entry.get("split") or "train"
        splits[uid] = split if entry.get("anomaly") is None else "anomalous"
        pos = entry.get("geometry", {}).get("anatomical_position")
        if pos:
            positions[uid] = pos
    return splits, positions


def normal_splits(
    root: Path, groups: list[dicom_series.SeriesFiles], seed: int = 0
) -> tuple[dict[str, str], dict[str, list[float]]]:
    """Split of every series: "train", "validation" (normals) or something else (left out).

    With a phantom `manifest.json` in `root`, its split fields ("test" stays "test", anomalous
    series become "anomalous"); otherwise every series in `groups` is normal and a seeded 10 %
    (at least 2) is "validation". Also returns the manifest's true body-axis positions per series.
    """
    meta = _manifest_splits(Path(root))
    if meta is not None:
        return meta
    splits: dict[str, str] = {}
    rng = np.random.default_rng([seed, 0x5A1])
    order = rng.permutation(len(groups))
    n_val = max(2, int(round(0.1 * len(groups))))
    for rank, idx in enumerate(order):
        splits[groups[idx].series_instance_uid] = "validation" if rank < n_val else "train"
    return splits, {}


def load_dataset(
    root: Path | str,
    size: int,
    *,
    jobs: int = 1,
    seed: int = 0,
    max_series: int | None = None,
    patch: imaging.PatchGeometry | None = None,
) -> Dataset:
    """Normal training and validation series under `root`, preprocessed to `size`².

    With `patch`, every series is a `PatchSeriesData` that also holds the patch recipe's input.

    Bad series (one slice, mixed sizes, unreadable …) are skipped with a warning naming them.

    Raises:
        ValueError: fewer than 2 usable training series or no validation series.
    """
    root = Path(root)
    groups = dicom_series.ct_series_in(scan_parallel(root, jobs))
    splits, truths = normal_splits(root, groups, seed)
    groups = [g for g in groups if splits.get(g.series_instance_uid) in ("train", "validation")]
    if max_series is not None:
        tr = [g for g in groups if splits[g.series_instance_uid] == "train"][:max_series]
        va = [g for g in groups if splits[g.series_instance_uid] == "validation"][: max(2, max_series // 4)]
        groups = tr + va
    work = [(g, size, patch) for g in groups]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            loaded = list(pool.map(_load_one, work, chunksize=1))
    else:
        loaded = [_load_one(w) for w in work]
    train: list[SeriesData] = []
    validation: list[SeriesData] = []
    skipped: list[str] = []
    for g, item in zip(groups, loaded):
        if isinstance(item, str):
            log.warning("skipping %s", item)
            skipped.append(item)
            continue
        truth = truths.get(item.series_instance_uid)
        if truth is not None and len(truth) == item.num_slices:
            item.true_positions = np.asarray(truth, np.float32)
        (validation if splits[g.series_instance_uid] == "validation" else train).append(item)
    if len(train) < 2 or not validation:
        raise ValueError(
            f"{root}: {len(train)} training and {len(validation)} validation CT series usable; need at least 2 and 1"
        )
    log.info(
        "data: %d training series (%d slices), %d validation series (%d slices), %d skipped, from %s",
        len(train),
        sum(s.num_slices for s in train),
        len(validation),
        sum(s.num_slices for s in validation),
        len(skipped),
        root,
    )
    return Dataset(train, validation, str(root), skipped)


def generate_phantom_training_set(
    out: Path, *, matrix: int, jobs: int, seed: int = 0, num_slices: int | None = None
) -> dict[str, Any]:
    """Write the train and validation splits of `gatekeeper phantom dataset` (no test split) to `out`.

    For the GPU run, where only the training data is needed. `num_slices` shortens the *training*
    series only: validation series keep realistic scan ranges, because the threshold calibrated on
    them must hold for real series (calibrating on short series let 64 % of unseen normals be
    flagged in the first shipped model). A spec the generator cannot plan is skipped with a
    warning instead of ending the run.
    """
    from service.phantom.generate import DEFAULT_NOISE_SIGMA, SeriesSpec, count_slices, dataset_specs, generate_run

    def protocol(slices: int | None) -> list[SeriesSpec]:
        return dataset_specs(seed=seed, large=False, num_slices=slices, matrix=matrix, noise_sigma=DEFAULT_NOISE_SIGMA)

    specs = [s for s in protocol(num_slices) if s.split == "train"]
    specs += [s for s in protocol(None) if s.split == "validation"]
    usable = []
    for s in specs:
        try:
            count_slices(s)
            usable.append(s)
        except ValueError as exc:
            log.warning("phantom spec %s skipped: %s", s.folder, exc)
    meta = {
        "seed": seed,
        "protocol": "dataset (train+validation only)",
        "command": f"models.detector phantom-train-set --matrix {matrix} --seed {seed}",
    }
    return generate_run(usable, out, jobs=jobs, progress=False, meta=meta)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
