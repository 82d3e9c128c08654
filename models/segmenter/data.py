"""Training data for the segmenter: CT series with liver contours, from any DICOM folder tree.

`--data DIR` is any folder tree holding CT series and their liver contours as DICOM-SEG or RT
Structure Set (matched by referenced SeriesInstanceUID, see `contours`). CT series without a
liver contour are left out (named in the log). Splits:

* a phantom run's `manifest.json` with `split` fields: its normal `train` and `validation` series
  (test and anomalous series are left out);
* otherwise every contoured series is used and a seeded 10 % (at least 1) is held out for validation.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.detector.data import _manifest_splits, scan_parallel
from models.segmenter.contours import LiverContour, find_liver_contours
from service import dicom_series
from service.segmentation import SegmenterInput, frame_series, prepare_volume

log = logging.getLogger(__name__)


@dataclass
class SegSeries:
    """One series at network size: windowed slices (float16, [0, 1]) and the liver mask."""

    series_instance_uid: str
    volume: np.ndarray  # float16 [k, S, S]
    liver: np.ndarray  # bool [k, S, S]
    folder: str = ""

    @property
    def num_slices(self) -> int:
        return int(self.volume.shape[0])


@dataclass
class SegDataset:
    train: list[SegSeries]
    validation: list[SegSeries]
    source: str
    skipped: list[str] = field(default_factory=list)

    def data_hash(self) -> str:
        """sha256 over the series' UIDs, prepared pixels and masks (order-free)."""
        h = hashlib.sha256()
        for name, group in (("train", self.train), ("validation", self.validation)):
            for s in sorted(group, key=lambda s: s.series_instance_uid):
                h.update(f"{name}:{s.series_instance_uid}:{s.num_slices}".encode())
                h.update(np.ascontiguousarray(s.volume).tobytes())
                h.update(np.packbits(s.liver).tobytes())
        return h.hexdigest()


def _load_one(args: tuple[dicom_series.SeriesFiles, LiverContour, SegmenterInput]) -> SegSeries | str:
    files, contour, spec = args
    try:
        series = dicom_series.load_series(files)
        mask = contour.volume_for(series)
    except ValueError as exc:  # SeriesError, ContourError
        return str(exc)
    framing = frame_series(series.hu, series.pixel_spacing_mm, spec)
    return SegSeries(
        series.series_instance_uid,
        prepare_volume(series.hu, spec, framing).astype(np.float16),
        framing.mask_to_field(mask),
        folder=str(series.folder),
    )


def load_dataset(
    root: Path | str,
    spec: SegmenterInput,
    *,
    jobs: int = 1,
    seed: int = 0,
    max_series: int | None = None,
    min_train: int = 2,
) -> SegDataset:
    """Contoured normal series under `root`, prepared at `spec.size`².

    `min_train` 0: a folder of validation series alone will do (the synth recipe renders its training data).

    Raises:
        ValueError: fewer than `min_train` usable training series or no validation series.
    """
    root = Path(root)
    groups = scan_parallel(root, jobs)
    contours = find_liver_contours(groups)
    cts = dicom_series.ct_series_in(groups)
    uncontoured = [g.series_instance_uid for g in cts if g.series_instance_uid not in contours]
    if uncontoured:
        log.info("%d CT series have no liver contour and are not used", len(uncontoured))
    cts = [g for g in cts if g.series_instance_uid in contours]
    meta = _manifest_splits(root)
    if meta is not None:
        splits = meta[0]
        cts = [g for g in cts if splits.get(g.series_instance_uid) in ("train", "validation")]
    else:
        splits = {}
        order = np.random.default_rng([seed, 0x5E6]).permutation(len(cts))
        n_val = max(1, int(round(0.1 * len(cts))))
        for rank, idx in enumerate(order):
            splits[cts[idx].series_instance_uid] = "validation" if rank < n_val else "train"
    if max_series is not None:
        tr = [g for g in cts if splits[g.series_instance_uid] == "train"][:max_series]
        va = [g for g in cts if splits[g.series_instance_uid] == "validation"][: max(1, max_series // 4)]
        cts = tr + va
    work = [(g, contours[g.series_instance_uid], spec) for g in cts]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            loaded = list(pool.map(_load_one, work, chunksize=1))
    else:
        loaded = [_load_one(w) for w in work]
    train: list[SegSeries] = []
    validation: list[SegSeries] = []
    skipped: list[str] = []
    for g, item in zip(cts, loaded):
        if isinstance(item, str):
            log.warning("skipping %s", item)
            skipped.append(item)
            continue
        (validation if splits[g.series_instance_uid] == "validation" else train).append(item)
    if len(train) < min_train or not validation:
        raise ValueError(
            f"{root}: {len(train)} training and {len(validation)} validation CT series with liver "
            f"contours usable; need at least {min_train} and 1"
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
    return SegDataset(train, validation, str(root), skipped)


def load_contoured_series(
    root: Path | str, spec: SegmenterInput, *, jobs: int = 1
) -> tuple[list[SegSeries], list[str]]:
    """Every CT series under `root` that has a liver contour, prepared at `spec.size`², in folder order.

    No split and no manifest rules: all of them (a training pool's series, mostly anomalous).
    Returns (series, why each unusable one was skipped).
    """
    root = Path(root)
    groups = scan_parallel(root, jobs)
    contours = find_liver_contours(groups)
    cts = [g for g in dicom_series.ct_series_in(groups) if g.series_instance_uid in contours]
    work = [(g, contours[g.series_instance_uid], spec) for g in cts]
    if jobs > 1 and len(work) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            loaded = list(pool.map(_load_one, work, chunksize=1))
    else:
        loaded = [_load_one(w) for w in work]
    series = [item for item in loaded if not isinstance(item, str)]
    skipped = [item for item in loaded if isinstance(item, str)]
    for problem in skipped:
        log.warning("skipping %s", problem)
    log.info("%d contoured CT series (%d slices) from %s", len(series), sum(s.num_slices for s in series), root)
    return series, skipped
