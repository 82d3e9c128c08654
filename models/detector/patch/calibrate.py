"""The patch recipe's threshold from held-out validation scores (leave one series out).

The normalisation table (`imaging.fit_patch_normalisation`) is fitted on the validation normals'
patches. Scoring those same series with it and taking the threshold from them is in-sample: each
series' own patches set the μ and σ it is measured against, so its z-scores come out lower than an
unseen patient's. (v4 on the seed split: validation normals 4.3–6.2, test normals 4.8–8.0; a
threshold at the validation maximum flagged 52 % of unseen normals.) Here each validation series
is scored with a table fitted on the *other* validation series only, and the threshold is set on
those held-out scores; the table the model ships still uses every validation series.

`recalibrate` applies this to a finished model folder from its ONNX files (`python -m
models.detector recalibrate --model DIR --data DATA`): same scores as serving.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.detector.metrics import threshold_at_false_flag_rate
from service import imaging

log = logging.getLogger(__name__)

#: How the threshold's validation scores were made (model.json `threshold_from`).
HELD_OUT = "leave-one-series-out: each validation series z-scored with the table of the other validation series"


@dataclass(frozen=True)
class ValidationPatchScores:
    """Raw patch scores of one validation series: scores [P], cond [P, 3], slice index [P] and the
    conditioning position of each of its slices [K]."""

    scores: np.ndarray
    cond: np.ndarray
    slice_index: np.ndarray
    positions: np.ndarray

    def __post_init__(self) -> None:
        n = np.asarray(self.scores).size
        if np.asarray(self.cond).shape != (n, 3):
            raise ValueError(f"ValidationPatchScores.cond must be [{n}, 3], got {np.asarray(self.cond).shape}.")
        if np.asarray(self.slice_index).size != n:
            raise ValueError(
                f"ValidationPatchScores.slice_index must have {n} entries, got {np.asarray(self.slice_index).size}."
            )


def fit_table(validation: list[ValidationPatchScores]) -> dict[str, Any]:
    """The normalisation table of the patches of every series in `validation`."""
    return imaging.fit_patch_normalisation(
        np.concatenate([v.scores for v in validation]), np.concatenate([v.cond for v in validation])
    )


def series_score_in_range(
    v: ValidationPatchScores, table: dict[str, Any], low: float, high: float, top: int
) -> tuple[float, int]:
    """(`v`'s series score with the normalisation `table`, slices counted), as serving computes it."""
    z = imaging.patch_z_scores(v.scores, v.cond, table)
    slices = imaging.slice_scores_from_patches(z, v.slice_index, len(v.positions))
    return imaging.series_score_in_range(slices, v.positions, low, high, top=top)


def series_score(v: ValidationPatchScores, table: dict[str, Any], low: float, high: float, top: int) -> float:
    """`v`'s series score with the normalisation `table` (as serving computes it)."""
    return series_score_in_range(v, table, low, high, top)[0]


def held_out_series_scores(validation: list[ValidationPatchScores], low: float, high: float, top: int) -> list[float]:
    """Each series' score with the table fitted on the other series' patches.

    Raises:
        ValueError: fewer than 2 validation series (nothing to hold out against).
    """
    if len(validation) < 2:
        raise ValueError(f"held-out calibration needs at least 2 validation series, got {len(validation)}.")
    out = []
    for i, v in enumerate(validation):
        table = fit_table([w for j, w in enumerate(validation) if j != i])
        out.append(round(series_score(v, table, low, high, top), 5))
    return out


def recalibrate(model_dir: Path, data: Path) -> dict[str, Any]:
    """Rewrite `model_dir`/model.json's threshold from held-out validation scores, scoring the
    validation normals of `data` (the training data: same split and seed as training) with the
    model's ONNX files. The normalisation table is refitted on every validation series (the same
    table training wrote, up to float rounding). Returns the new model.json.

    Raises:
        ValueError: not a patch-recipe model, or `data` holds no validation series.
    """
    from models.detector.data import normal_splits
    from service import dicom_series
    from service.inference import PATCH_TOP_SLICES, PatchDetector, load_detector

    meta: dict[str, Any] = json.loads((model_dir / "model.json").read_text())
    detector = load_detector(model_dir)
    if not isinstance(detector, PatchDetector):
        raise ValueError(f"{model_dir}: recalibrate applies to patch-recipe models (model.json format 2).")
    groups = dicom_series.scan_tree(data)
    training = meta.get("training", {})
    splits, _ = normal_splits(data, groups, int(training.get("seed", 0)))
    chosen = [g for g in groups if splits.get(g.series_instance_uid) == "validation"]
    max_series = training.get("max_series")
    if max_series:
        chosen = chosen[: max(2, int(max_series) // 4)]
    if not chosen:
        raise ValueError(f"--data {data}: no validation series (is it the model's training data?)")
    validation = []
    for g in chosen:
        series = dicom_series.load_series(g)
        positions = detector.positions(series)
        fields, masks, boxes = imaging.preprocess_patch_series(series.hu, series.pixel_spacing_mm, detector.geometry)
        raw, cond, slice_index, _ = detector.raw_patch_scores(fields, masks, boxes, positions)
        validation.append(ValidationPatchScores(raw, cond, slice_index, positions))
    low, high, top = detector.position_low, detector.position_high, PATCH_TOP_SLICES
    table = fit_table(validation)
    held_out = held_out_series_scores(validation, low, high, top)
    rate = float(meta.get("target_false_flag_rate", 0.05))
    old = meta["threshold"]
    meta.update(
        {
            "normalisation": {**meta["normalisation"], **table},
            "threshold": round(threshold_at_false_flag_rate(np.array(held_out), rate), 5),
            "threshold_from": HELD_OUT,
            "validation_series_scores": [round(series_score(v, table, low, high, top), 5) for v in validation],
            "validation_series_scores_held_out": held_out,
        }
    )
    (model_dir / "model.json").write_text(json.dumps(meta, indent=1) + "\n")
    log.info("%s: threshold %.4g → %.4g (held-out validation scores %s)", model_dir, old, meta["threshold"], held_out)
    return meta
