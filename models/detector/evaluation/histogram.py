"""The HU-histogram baseline, fitted at evaluation time on the normal training series of a phantom run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from models.detector.baselines import HistogramBaseline, hu_histograms
from models.detector.data import normal_splits
from models.detector.evaluation.methods import DetectorMethod
from models.detector.evaluation.statistics import TARGET_FALSE_FLAG_RATE
from models.detector.metrics import threshold_at_false_flag_rate
from service import dicom_series

log = logging.getLogger(__name__)


def fit_histogram_baseline(root: Path, detector: DetectorMethod, *, seed: int = 0) -> HistogramBaseline:
    """Fit `HistogramBaseline` on the normal training series under `root`; threshold on its validation ones.

    Slice positions come from `detector` (its position method), the aggregation is the detector's
    (for a patch detector: the top-3 mean over all slices).

    Raises:
        ValueError: no usable normal training series under `root`.
    """
    groups = dicom_series.ct_series_in(dicom_series.scan_tree(root))
    splits, _ = normal_splits(root, groups, seed)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "validation": []}
    for g in groups:
        split = splits.get(g.series_instance_uid)
        if split not in parts:
            continue
        try:
            series = dicom_series.load_series(g)
        except dicom_series.SeriesError as exc:
            log.warning("HU histogram: skipping %s", exc)
            continue
        parts[split].append((hu_histograms(series.hu), detector.positions(series)))
    if not parts["train"]:
        raise ValueError(
            f"{root}: no normal training series to fit the HU-histogram baseline on (phantom split "
            "'train', or any CT series when there is no manifest.json); give --train-data"
        )
    model = HistogramBaseline.fit(
        [f for f, _ in parts["train"]], [p for _, p in parts["train"]], aggregation=detector.series_aggregation
    )
    if parts["validation"]:
        scores = [model.series_score(model.slice_scores(f, p)) for f, p in parts["validation"]]
        model.threshold = threshold_at_false_flag_rate(np.array(scores), TARGET_FALSE_FLAG_RATE)
    log.info(
        "HU histogram fitted on %d series (%d slices), threshold %s from %d validation series",
        model.train_series,
        model.train_slices,
        model.threshold,
        len(parts["validation"]),
    )
    return model
