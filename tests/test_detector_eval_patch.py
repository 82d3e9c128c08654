"""Detector v2 in the evaluation and the benchmark: a tiny trained patch-recipe GAN (format 2) against
the shipped format-1 model, its unconditioned twin, the coarse-noise denoising autoencoder and the HU
histogram in one `gatekeeper evaluate detector` run; `gatekeeper bench score` on the patch model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from detector_support import labelled_run  # noqa: E402

from service.commands.main import main as gatekeeper  # noqa: E402
from service.model_paths import DEFAULT_DETECTOR_DIR  # noqa: E402

torch.set_num_threads(1)  # a shared 2-core machine

TYPES = ("tumor", "stent", "fluid")
SLICES = 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 train + 2 validation normals; test: 2 normals, a tumor, a stent and a fluid series (64²; 8 slices,
    the fewest body-part regression trains on)."""
    out = tmp_path_factory.mktemp("phantom")
    labelled_run(out, test_anomalies=TYPES, slices=SLICES)
    return out


def _train_patch(data: Path, out: Path, *extra: str) -> Path:
    args = ["train", "detector", "--recipe", "patch", "--data", str(data), "--out", str(out), "--stride", "32"]
    args += ["--batch", "8", "--position-steps", "2", "--gan-steps", "3", "--encoder-steps", "2", "--seed", "3"]
    assert gatekeeper([*args, "--jobs", "1", "--threads", "1", "--no-progress", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def patch_model(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train_patch(run_dir, tmp_path_factory.mktemp("patch"))


@pytest.fixture(scope="module")
def unconditioned(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same command with --unconditioned: the position-conditioning ablation."""
    return _train_patch(run_dir, tmp_path_factory.mktemp("patch_unconditioned"), "--unconditioned")


@pytest.fixture(scope="module")
def dae(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dae")
    args = ["train", "autoencoder", "--data", str(run_dir), "--out", str(out), "--size", "64", "--noise", "coarse"]
    assert gatekeeper([*args, "--noise-res", "8", "--steps", "6", "--batch", "4", "--jobs", "1", "--threads", "1"]) == 0
    return out


def test_coarse_noise_is_low_resolution_and_shifted() -> None:
    from models.detector.autoencoder.networks import coarse_noise

    gen = torch.Generator().manual_seed(0)
    noise = coarse_noise(4, 64, 8, 0.2, gen)
    assert noise.shape == (4, 1, 64, 64)
    assert 0.05 < float(noise.std()) < 0.25
    # Coarse: neighbouring pixels differ far less than the noise varies (white noise: about √2 × std).
    assert float((noise[..., 1:] - noise[..., :-1]).abs().mean()) < 0.2 * float(noise.std())
    again = coarse_noise(4, 64, 8, 0.2, torch.Generator().manual_seed(0))
    other = coarse_noise(4, 64, 8, 0.2, gen)
    assert torch.equal(noise, again) and not torch.equal(noise, other)


def test_dae_is_calibrated_on_validation_normals_and_exports_faithfully(dae: Path) -> None:
    from models.detector.autoencoder.networks import DenoisingScorer
    from models.detector.autoencoder.train import load_scorer

    meta = json.loads((dae / "model.json").read_text())
    assert meta["kind"] == "ct-slice-autoencoder" and meta["architecture"] == "unet"
    assert meta["noise"]["kind"] == "coarse" and meta["noise"]["resolution"] == 8 and meta["noise"]["std"] == 0.2
    assert meta["training"]["steps"] == 6 and meta["training"]["train_series"] == 3
    assert "--noise coarse" in meta["training"]["command"] and "--minutes" in meta["training"]["command"]
    assert max(meta["validation_series_scores"]) <= meta["threshold"] + 1e-4

    scorer = load_scorer(dae)
    assert isinstance(scorer, DenoisingScorer)
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (3, 1, 64, 64)).astype(np.float32)
    m = (rng.uniform(size=(3, 1, 64, 64)) > 0.4).astype(np.float32)
    got = ort.InferenceSession(str(dae / "autoencoder.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": x, "mask": m}
    )
    with torch.no_grad():
        want = [t.numpy() for t in scorer(torch.from_numpy(x), torch.from_numpy(m))]
    for g, w in zip(got, want):
        assert np.abs(g - w).max() / (np.abs(w).max() + 1e-12) < 1e-4
    # The slice error is local: the largest Gaussian-smoothed (σ 2 px) residual inside the body.
    from scipy import ndimage

    smooth = [ndimage.gaussian_filter(r[0].astype(np.float64), 2.0, mode="constant", truncate=3.0) for r in want[2]]
    expected = [float((sm * mk[0]).max()) for sm, mk in zip(smooth, m)]
    np.testing.assert_allclose(want[1], expected, rtol=1e-4)


def test_one_run_scores_the_patch_gan_the_shipped_model_the_twin_and_the_baselines(
    run_dir: Path, patch_model: Path, unconditioned: Path, dae: Path, tmp_path: Path
) -> None:
    from service import dicom_series
    from service.inference import PATCH_MAP_SIZE, PatchDetector, load_detector

    report_dir = tmp_path / "report"
    args = ["evaluate", "detector", "--data", str(run_dir), "--model", str(patch_model), "--out", str(report_dir)]
    args += ["--ablation", str(unconditioned), "--ablation-twin", str(patch_model)]
    args += ["--compare", f"shipped={DEFAULT_DETECTOR_DIR}", "--autoencoder", str(dae), "--bootstrap", "50"]
    assert gatekeeper(args) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["model_format"] == 2 and report["recipe"] == "patch" and report["conditioned"] is True
    assert report["series"] == 5 and report["normal_series"] == 2
    methods = report["methods"]
    assert list(methods) == ["detector", "twin", "ablation", "shipped", "autoencoder", "hu_histogram"]
    assert methods["shipped"]["label"] == "shipped (slice recipe, stylegan2 128²)"
    assert methods["shipped"]["training"]["steps"]  # the shipped model's own record
    assert methods["autoencoder"]["label"] == "coarse-noise DAE"
    assert methods["detector"]["aggregation"] == "top3_mean of in-range slices"
    for name, m in methods.items():
        assert set(m["per_type"]) == {*TYPES, "all"}, name
        for kind, v in m["per_type"].items():
            assert 0.0 <= v["auroc"] <= 1.0 and v["auroc_ci95"][0] <= v["auroc_ci95"][1], (name, kind)
            assert v["n"] == (3 if kind == "all" else 1)
        assert m["false_flag_rate_normals"] in (0.0, 0.5, 1.0), name  # 2 unseen normals, each at its threshold
        assert 0.0 <= m["slice_auroc"] <= 1.0 and m["scoring_seconds"] >= 0.0
    assert methods["hu_histogram"]["localisation"] is None
    for name in ("detector", "twin", "ablation", "shipped", "autoencoder"):
        loc = methods[name]["localisation"]["all"]
        assert loc["n"] == 3 and 0 < loc["slices"] <= 3 * SLICES, name
        assert 0.0 <= loc["hit_rate"] <= 1.0 and 0.0 <= loc["slice_hit_rate"] <= 1.0 and 0.0 < loc["chance"] < 1.0
    # The twin is the same folder as --model here: the same scores, series by series.
    rows = report["rows"]
    assert all(r["scores"]["twin"] == r["scores"]["detector"] for r in rows)
    # Patch maps are located on their 128² grid in the image geometry.
    for r in rows:
        if r["type"] != "normal":
            assert all(0 <= v < PATCH_MAP_SIZE for v in r["localisation"]["detector"]["argmax"])
            assert r["localisation"]["detector"]["slices_affected"] >= 1
    # The series score is what serving gives the series.
    detector = load_detector(patch_model)
    assert isinstance(detector, PatchDetector)
    tumor = next(r for r in rows if r["type"] == "tumor")
    (group,) = dicom_series.ct_series_in(dicom_series.scan_tree(run_dir / tumor["folder"]))
    assert detector.score_series(dicom_series.load_series(group)).score == pytest.approx(
        tumor["scores"]["detector"], abs=1e-4
    )
    # Paired differences to the detector, and the matched pair.
    assert set(report["differences"]) == {
        "twin",
        "ablation",
        "shipped",
        "autoencoder",
        "hu_histogram",
        "twin_minus_ablation",
    }
    for name, per_type in report["differences"].items():
        for kind, d in per_type.items():
            assert d["ci95"][0] <= d["difference"] + 1e-9 and d["difference"] <= d["ci95"][1] + 1e-9, (name, kind)
    assert report["differences"]["twin"]["all"]["difference"] == 0.0
    targets = [t["target"] for t in report["targets"]]
    for label in ("shipped (slice recipe, stylegan2 128²)", "coarse-noise DAE", "HU histogram"):
        assert any(t.startswith(f"better than {label} on every anomaly type") for t in targets), label

    md = (report_dir / "report.md").read_text()
    assert "GAN detector (patch v2)" in md and "patch recipe dcgan, local score, 32² patches at 1.5 mm" in md
    assert "## Cost (training budget and scoring time of this run)" in md and "| shipped (slice recipe" in md
    assert re.search(r"^\| fluid \| 1 \|", md, re.M)
    for png in ("roc.png", "profiles.png", "heatmaps.png"):
        assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in md


def test_a_detector_option_naming_an_autoencoder_or_a_bad_compare_name_is_refused(
    run_dir: Path, patch_model: Path, dae: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["evaluate", "detector", "--data", str(run_dir), "--model", str(patch_model), "--out", str(tmp_path)]
    for extra, reason in (
        (["--ablation", str(dae)], "is an autoencoder, not a detector"),
        (["--compare", f"detector={dae}"], "is a fixed method name"),
        (["--compare", f"a={dae}", "--compare", f"a={patch_model}"], "used twice"),
    ):
        capsys.readouterr()
        rc = gatekeeper([*base, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and reason in err.strip().splitlines()[-1] and "Traceback" not in err, err


def test_bench_score_times_the_patch_scorer_and_a_series(
    patch_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    out_json = tmp_path / "bench.json"
    assert (
        gatekeeper(
            ["bench", "score", "--quick", "--model", str(patch_model), "--threads", "1", "--json", str(out_json)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert re.search(r"^ORT / eager fp32 at batch 16: \d+\.\d\d× \(target ≥ 1\.3×: (met|missed)\)$", out, re.M), out
    assert re.search(r"\| 16 \| ONNX Runtime fp32 \(fused scorer\) \| [\d.]+ \| \d+ \| \d+ % \| [\d.]+× \|", out), out
    assert "patches/s" in out and "the model's patch_scorer.onnx (the served graph)" in out
    assert re.search(
        r"^16-slice 64² series end to end .* patch scores [\d.]+ s \(\d+ patches\) = \d+\.\d\d s", out, re.M
    )
    result = json.loads(out_json.read_text())
    assert result["item"] == "patch" and result["fresh_weights"] is False
    assert 0.001 < result["gflop_per_item"] < 1.0
    rates = result["rates"]["16"]
    assert set(rates) == {"torch_fp32", "ort_fp32", "torch_bf16"} and min(rates.values()) > 0
    assert result["agreement"]["16"]["ort_terms_max_rel"] < 1e-4  # the served graph computes the torch scorer
    series = result["series"]
    assert series["patches"] > 0 and series["patches_per_slice"] == pytest.approx(series["patches"] / 16, abs=0.1)
    parts = series["read_s"] + series["position_s"] + series["preprocess_s"] + series["score_s"]
    assert parts == pytest.approx(series["total_s"], abs=0.05)
