"""`gatekeeper evaluate detector --diagnose`: the measurements, and the tool end to end on tiny phantoms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.detector.diagnose import lesion_contrast, residual_ratio, top_slices
from service.commands.main import main
from service.model_paths import DEFAULT_DETECTOR_DIR


def test_lesion_contrast_measures_the_step_against_the_ring_and_its_noise() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 0.05, (64, 64))
    lesion = np.zeros((64, 64), bool)
    lesion[20:30, 20:30] = True
    image[lesion] -= 0.4
    result = lesion_contrast(image, lesion, np.ones((64, 64), bool))
    assert result["pixels"] == 100
    assert result["contrast"] == pytest.approx(0.4, abs=0.03)
    assert result["ring_noise"] == pytest.approx(0.05, abs=0.01)
    assert result["cnr"] == pytest.approx(8, rel=0.25)


def test_lesion_contrast_refuses_an_empty_mask() -> None:
    with pytest.raises(ValueError, match="anomaly mask is empty"):
        lesion_contrast(np.zeros((8, 8)), np.zeros((8, 8), bool), np.ones((8, 8), bool))


def test_residual_ratio_says_whether_the_anomaly_reconstructs_worse_than_the_body() -> None:
    maps = np.full((3, 16, 16), 0.2)
    anomaly = np.zeros((3, 16, 16), bool)
    anomaly[1, 4:8, 4:8] = True
    body = np.ones((3, 16, 16), bool)
    maps[1][anomaly[1]] = 0.05  # reconstructed better than the body: hidden
    assert residual_ratio(maps, anomaly, body) < 1
    maps[1][anomaly[1]] = 0.9  # stands out
    assert residual_ratio(maps, anomaly, body) > 1
    with pytest.raises(ValueError, match="no slice is affected"):
        residual_ratio(maps, np.zeros_like(anomaly), body)


def test_top_slices_are_the_highest_scores() -> None:
    assert top_slices(np.array([0.1, 3.0, -1.0, 2.0, 5.0])).tolist() == [4, 1, 3]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tumour series and four normal ones, 16 slices at 128²."""
    data = tmp_path_factory.mktemp("diagnose_phantoms")
    for name, anomaly, seed in (("tumor", "tumor", 5), ("normal", "none", 6)):
        args = ["phantom", "--out", str(data / name), "--series", "4" if anomaly == "none" else "1"]
        assert (
            main([*args, "--slices", "16", "--matrix", "128", "--seed", str(seed), "--anomaly", anomaly, "--quiet"])
            == 0
        )
    return data


def _diagnose(data: Path, model: Path, out: Path) -> dict:
    code = main(["evaluate", "detector", "--diagnose", "--data", str(data), "--model", str(model), "--out", str(out)])
    assert code == 0
    report: dict = json.loads((out / "report.json").read_text())
    tumor = report["by_kind"]["tumor"]
    assert tumor["series"] == 1 and 0 <= tumor["residual_ratio_median"] < 50
    assert tumor["top_slices"] == 3 and 0 <= tumor["top_slices_on_anomaly"] <= 3
    assert len([s for s in report["series"] if s["kind"] == "normal"]) == 4
    for figure in ("input_reconstruction_residual.png", "score_profiles.png", "scan_range.png"):
        assert (out / figure).stat().st_size > 5000
        assert f"]({figure})" in (out / "report.md").read_text()
    return report


@pytest.mark.slow
def test_diagnose_writes_a_report_with_figures_for_each_anomaly_type(phantoms: Path, tmp_path: Path) -> None:
    _diagnose(phantoms, DEFAULT_DETECTOR_DIR, tmp_path / "diagnosis")


@pytest.mark.slow
def test_diagnose_reads_a_patch_model(phantoms: Path, tmp_path: Path) -> None:
    """Format 2 (the patch recipe): a tiny model trained on the normals, diagnosed on the image grid."""
    model, normals = tmp_path / "patch", tmp_path / "normals"
    shutil.copytree(phantoms / "normal", normals)
    (normals / "manifest.json").unlink()  # without a manifest the trainer holds out validation series itself
    train = ["train", "detector", "--recipe", "patch", "--family", "aae", "--data", str(normals)]
    steps = ["--gan-steps", "2", "--encoder-steps", "1", "--position-steps", "2", "--batch", "8", "--stride", "32"]
    assert main([*train, "--out", str(model), *steps, "--jobs", "1", "--threads", "1", "--no-progress"]) == 0
    report = _diagnose(phantoms, model, tmp_path / "diagnosis")
    tumor = next(s for s in report["series"] if s["kind"] == "tumor")
    assert tumor["input"]["pixels"] > 0 and np.isfinite(tumor["series_score"])


def test_diagnose_without_phantoms_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "evaluate",
            "detector",
            "--diagnose",
            "--data",
            str(tmp_path),
            "--model",
            str(DEFAULT_DETECTOR_DIR),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "no phantom manifest.json" in capsys.readouterr().err
