"""Pieces of the detector evaluation without torch: HU-histogram baseline, paired bootstrap, localisation,
patch z-maps, --compare names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.detector.baselines import HistogramBaseline, hu_histograms
from models.detector.evaluate import parse_compare
from models.detector.evaluation.localisation import localise
from models.detector.metrics import paired_bootstrap_difference, roc_curve
from models.detector.patch.scoring import patch_version, uncovered_to_slice_minimum


def _slices(k: int, rng: np.random.Generator, *, lung: bool = False, metal: bool = False) -> np.ndarray:
    """k 64² slices in HU: air around a soft-tissue ellipse with a fat rim; optional lung or metal inside."""
    yy, xx = np.mgrid[0:64, 0:64]
    r2 = ((yy - 32) / 24.0) ** 2 + ((xx - 32) / 28.0) ** 2
    hu = np.full((k, 64, 64), -1000.0, np.float32)
    hu[:, r2 < 1.0] = -90.0  # fat rim
    hu[:, r2 < 0.7] = 45.0  # soft tissue
    if lung:
        hu[:, (r2 < 0.5) & (xx < 30)] = -850.0
    if metal:
        hu[:, 28:36, 40:46] = 3000.0
    return hu + rng.normal(0, 10, hu.shape).astype(np.float32)


def test_hu_histogram_baseline_flags_metal_and_knows_where_lungs_belong() -> None:
    rng = np.random.default_rng(0)
    features, positions = [], []
    for _ in range(4):  # normal series: lungs in the upper half of the body axis only
        p = np.linspace(0, 1, 10)
        hu = np.concatenate([_slices(5, rng, lung=True), _slices(5, rng)])
        features.append(hu_histograms(hu))
        positions.append(p)
    model = HistogramBaseline.fit(features, positions, aggregation="max")
    assert model.train_series == 4 and model.train_slices == 40

    normal = model.slice_scores(hu_histograms(_slices(3, rng)), np.array([0.7, 0.8, 0.9]))
    metal = model.slice_scores(hu_histograms(_slices(1, rng, metal=True)), np.array([0.8]))
    assert metal[0] > normal.max() + 10, (metal, normal)
    assert np.abs(normal).max() < 5

    lung = hu_histograms(_slices(1, rng, lung=True))
    where_lungs_are = model.slice_scores(lung, np.array([0.1]))[0]
    where_lungs_are_not = model.slice_scores(lung, np.array([0.9]))[0]
    assert where_lungs_are_not > where_lungs_are + 10, (where_lungs_are, where_lungs_are_not)

    d = model.as_dict()
    assert d["position_bins"] == 10 and len(d["mu"]) == 10 and len(d["mu"][0]) == len(d["hu_bin_edges"]) + 1
    with pytest.raises(ValueError, match="aggregation"):
        HistogramBaseline.fit(features, positions, aggregation="median")


def test_hu_histograms_are_fractions_of_the_body_only() -> None:
    hu = _slices(1, np.random.default_rng(1))
    h = hu_histograms(hu)
    assert h.shape == (1, 23)
    assert (h**2).sum() == pytest.approx(1.0)  # √fractions: squares sum to one
    assert h[0, 0] == 0.0  # the air around the body is not counted
    assert hu_histograms(np.full((1, 16, 16), -1000.0, np.float32)).sum() == 0.0


def test_paired_bootstrap_difference_excludes_zero_only_for_a_real_difference() -> None:
    rng = np.random.default_rng(2)
    neg, pos = rng.normal(size=30), rng.normal(2.0, size=20)
    diff, ci = paired_bootstrap_difference(neg, pos, neg, pos, 200)
    assert diff == 0.0 and ci == [0.0, 0.0]
    better_neg, better_pos = np.zeros(30), np.ones(20)  # separates perfectly
    worse_neg, worse_pos = rng.normal(size=30), rng.normal(size=20)  # chance
    diff, ci = paired_bootstrap_difference(better_neg, better_pos, worse_neg, worse_pos, 200)
    assert diff > 0.2 and ci[0] > 0
    with pytest.raises(ValueError, match="same series"):
        paired_bootstrap_difference(neg, pos, neg[:-1], pos, 10)


def test_roc_curve_runs_from_origin_to_one() -> None:
    fpr, tpr = roc_curve(np.array([0.0, 1.0, 2.0]), np.array([1.5, 3.0]))
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(5 / 6)  # = AUROC


def test_localise_uses_the_top_affected_slice_and_checks_the_peak() -> None:
    k, s = 4, 32
    anomaly = np.zeros((k, s, s), bool)
    anomaly[1, 10:14, 10:14] = True
    anomaly[2, 10:14, 10:14] = True
    body = np.zeros((k, s, s), bool)
    body[:, 4:28, 4:28] = True
    maps = np.zeros((k, s, s), np.float32)
    maps[2, 12, 12] = 5.0  # peak inside the mask on slice 2
    maps[1, 24, 24] = 5.0  # peak far from it on slice 1
    scores = np.array([9.0, 1.0, 2.0, 0.0])  # slice 0 scores highest but is not affected
    hit = localise(scores, maps, anomaly, body)
    assert hit is not None and hit["slice"] == 2 and hit["hit"] and hit["argmax"] == (12, 12)
    assert hit["chance"] == pytest.approx(8 * 8 / 24**2)  # 4×4 square dilated by 2 px, over the body
    miss = localise(np.array([9.0, 3.0, 2.0, 0.0]), maps, anomaly, body)
    assert miss is not None and miss["slice"] == 1 and not miss["hit"]
    assert localise(scores, maps, np.zeros_like(anomaly), body) is None
    assert hit["slices_affected"] == 2 and hit["slices_hit"] == 1  # slice 2's peak is in, slice 1's is not


def test_patch_map_pixels_no_patch_covers_are_never_the_peak() -> None:
    """Served patch z-maps are 0 where no patch lies; negative z inside must still give the peak."""
    k, s = 2, 32
    maps = np.zeros((k, s, s), np.float32)
    maps[0, 8:24, 8:24] = -2.0  # covered, below the normals' mean everywhere …
    maps[0, 16:20, 16:20] = -0.5  # … except a less typical spot: the evidence peak
    body = np.zeros((k, s, s), bool)
    body[:, 4:28, 4:28] = True  # the body's rim (4..8, 24..28) is covered by no patch
    anomaly = np.zeros((k, s, s), bool)
    anomaly[0, 17:19, 17:19] = True
    fixed = uncovered_to_slice_minimum(maps)
    assert fixed[0, 5, 5] == -2.0 and fixed[0, 17, 17] == -0.5
    assert (fixed[1] == 0).all()  # a slice without patches stays as it is
    assert not localise(np.array([1.0, 0.0]), maps, anomaly, body)["hit"]  # the rim's 0 would win
    located = localise(np.array([1.0, 0.0]), fixed, anomaly, body)
    assert located is not None and located["hit"]


def test_compare_names_come_from_the_option_or_the_folder() -> None:
    assert parse_compare(["shipped=models/detector/default", "runs/gpu-v2/"]) == [
        ("shipped", Path("models/detector/default")),
        ("gpu-v2", Path("runs/gpu-v2/")),
    ]
    with pytest.raises(ValueError, match="fixed method name"):
        parse_compare(["hu_histogram=x"])
    with pytest.raises(ValueError, match="used twice"):
        parse_compare(["a/model", "b/model"])
    with pytest.raises(ValueError, match="must start with a letter"):
        parse_compare(["1st=x"])


def test_patch_version_names_the_recipe_from_model_json() -> None:
    assert patch_version({"family": "dcgan"}) == "patch v2"
    assert patch_version({"family": "aae"}) == "patch v3"  # before aae_noise was recorded
    assert patch_version({"family": "aae", "aae_noise": {"hu_std": 0.0, "grid": 4}}) == "patch v3"
    assert patch_version({"family": "aae", "aae_noise": {"hu_std": 40.0, "grid": 3}}) == "patch v4"
