"""Held-out (leave-one-series-out) calibration of the patch recipe's threshold: pure numpy."""

from __future__ import annotations

import numpy as np
import pytest

from models.detector.patch.calibrate import ValidationPatchScores, held_out_series_scores, series_score
from service import imaging


def _series(rng: np.random.Generator, shift: float, slices: int = 6, per_slice: int = 40) -> ValidationPatchScores:
    n = slices * per_slice
    cond = np.column_stack([np.full(n, 0.5), rng.uniform(0.3, 0.45, n), rng.uniform(0.3, 0.45, n)])
    return ValidationPatchScores(
        rng.normal(shift, 1.0, n), cond, np.repeat(np.arange(slices), per_slice), np.full(slices, 0.5)
    )


def test_each_series_is_scored_against_the_other_series_table() -> None:
    rng = np.random.default_rng(0)
    validation = [_series(rng, shift) for shift in (0.0, 0.3, 1.5)]
    held_out = held_out_series_scores(validation, 0.0, 1.0, 3)
    for i, v in enumerate(validation):
        others = [w for j, w in enumerate(validation) if j != i]
        table = imaging.fit_patch_normalisation(
            np.concatenate([w.scores for w in others]), np.concatenate([w.cond for w in others])
        )
        assert held_out[i] == pytest.approx(series_score(v, table, 0.0, 1.0, 3), abs=1e-5)
    # In-sample, the odd series pulls the table towards itself and scores lower than held out.
    table_all = imaging.fit_patch_normalisation(
        np.concatenate([w.scores for w in validation]), np.concatenate([w.cond for w in validation])
    )
    in_sample = [series_score(v, table_all, 0.0, 1.0, 3) for v in validation]
    assert held_out[2] > in_sample[2] + 0.5


def test_held_out_needs_two_series_and_consistent_shapes() -> None:
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="at least 2"):
        held_out_series_scores([_series(rng, 0.0)], 0.0, 1.0, 3)
    with pytest.raises(ValueError, match="cond"):
        ValidationPatchScores(np.zeros(4), np.zeros((3, 3)), np.zeros(4, int), np.zeros(1))
    with pytest.raises(ValueError, match="slice_index"):
        ValidationPatchScores(np.zeros(4), np.zeros((4, 3)), np.zeros(3, int), np.zeros(1))
