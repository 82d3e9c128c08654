"""Numbers shared by training and serving: preprocessing, positions, aggregation, threshold, AUROC."""

from __future__ import annotations

import numpy as np
import pytest

from models.detector.metrics import auprc, auroc
from service import imaging


def test_preprocess_windows_scales_and_masks_the_body() -> None:
    hu = np.full((2, 128, 128), -1000.0, np.float32)
    hu[:, 20:100, 30:90] = 40.0  # soft tissue
    hu[:, 50:60, 50:60] = -900.0  # gas inside the body: still body (holes filled)
    hu[:, 120:124, 10:120] = 200.0  # the table: a separate, smaller component
    images, masks = imaging.preprocess_slices(hu, 64)
    assert images.shape == masks.shape == (2, 64, 64) and images.dtype == np.float32
    assert images.min() == -1.0 and images[0, 30, 40] == pytest.approx(2 * (40 + 150) / 400 - 1, abs=1e-5)
    assert masks[0, 27, 27] and not masks[0, 61, 30] and not masks[0, 2, 2]
    assert masks[0].sum() == pytest.approx(40 * 30, rel=0.05)


def test_fitted_positions_follow_slice_locations_and_ignore_an_outlier() -> None:
    locations = 100.0 - 5.0 * np.arange(20)  # head → feet, 5 mm apart
    raw = 0.7 + (100.0 - locations) / 100.0
    raw[7] += 3.0  # one slice the regressor got wrong
    fitted = imaging.fit_series_positions(raw, locations, mm_per_unit=100.0)
    np.testing.assert_allclose(fitted, 0.7 + 0.05 * np.arange(20), atol=1e-5)


@pytest.mark.parametrize(("method", "expected"), [("max", 9.0), ("top3_mean", 8.0), ("smooth3_max", 8.0)])
def test_aggregations(method: str, expected: float) -> None:
    assert imaging.aggregate_slice_scores(np.arange(10.0)[::-1], method) == pytest.approx(expected)


def test_smoothing_aggregation_discounts_a_single_slice_spike() -> None:
    spike = np.zeros(30)
    spike[10] = 9.0
    run = np.zeros(30)
    run[10:14] = 4.0
    assert imaging.aggregate_slice_scores(spike, "max") > imaging.aggregate_slice_scores(run, "max")
    assert imaging.aggregate_slice_scores(spike, "smooth5_max") < imaging.aggregate_slice_scores(run, "smooth5_max")
    with pytest.raises(ValueError, match="unknown aggregation"):
        imaging.aggregate_slice_scores(spike, "median")


def test_threshold_allows_at_most_the_target_false_flag_rate() -> None:
    from models.detector.metrics import threshold_at_false_flag_rate

    scores = np.random.default_rng(0).normal(size=40)
    for rate in (0.0, 0.05, 0.1, 0.25):
        t = threshold_at_false_flag_rate(scores, rate)
        assert np.mean(scores > t) <= rate + 1e-12
        assert np.mean(scores >= t) > rate  # and it is the smallest such threshold among the scores


def test_auroc_and_auprc_on_known_cases() -> None:
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    rng = np.random.default_rng(1)
    neg, pos = rng.normal(size=200), rng.normal(1.0, size=150)
    u = (pos[:, None] > neg[None, :]).mean()
    assert auroc(neg, pos) == pytest.approx(u)
    assert auprc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0


def test_position_normalisation_follows_a_position_trend_and_global_is_constant() -> None:
    torch = pytest.importorskip("torch")  # noqa: F841 — calibrate imports the torch scorer
    from models.detector.stylegan2.calibrate import position_normalisation

    rng = np.random.default_rng(3)
    p = rng.uniform(0, 1, 2000)
    residual = 1.0 + 2.0 * p + rng.normal(0, 0.1, p.size)  # e.g. harder slices further down
    feature = np.full(p.size, 0.5) + rng.normal(0, 0.01, p.size)
    grid, table = position_normalisation(p, residual, feature)
    assert grid.size == 10 and np.all(np.diff(grid) > 0)
    np.testing.assert_allclose(table[0], 1.0 + 2.0 * grid, atol=0.08)  # μ_r tracks the trend
    assert np.all(table[1] < 0.2)  # σ_r is the noise around the trend, not the trend's spread
    grid, table = position_normalisation(p, residual, feature, by_position=False)
    assert grid.tolist() == [0.0, 1.0] and np.all(table[:, 0] == table[:, 1])
    assert table[1, 0] == pytest.approx(residual.std(), rel=1e-6)
