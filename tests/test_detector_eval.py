"""`gatekeeper train autoencoder` and `gatekeeper evaluate detector` with every baseline, on tiny phantom data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from detector_support import SIZE, labelled_run, untrained_detector  # noqa: E402

from service.commands.main import main as gatekeeper  # noqa: E402

torch.set_num_threads(1)  # fastest on a shared 2-core machine


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 train + 2 validation normals; test: 2 normals, a tumor and a stent (10 slices, 64²)."""
    out = tmp_path_factory.mktemp("phantom")
    labelled_run(out)
    return out


@pytest.fixture(scope="module")
def autoencoder(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ae")
    assert (
        gatekeeper(
            [
                "train",
                "autoencoder",
                "--data",
                str(run_dir),
                "--out",
                str(out),
                "--size",
                str(SIZE),
                "--steps",
                "40",
                "--batch",
                "8",
                "--seed",
                "3",
                "--jobs",
                "1",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    return out


def test_autoencoder_learns_is_calibrated_on_validation_normals_and_exports_faithfully(autoencoder: Path) -> None:
    from models.detector.autoencoder.train import load_scorer

    meta = json.loads((autoencoder / "model.json").read_text())
    assert meta["kind"] == "ct-slice-autoencoder" and meta["size"] == SIZE
    assert meta["training"]["train_series"] == 3 and meta["training"]["validation_series"] == 2
    assert meta["training"]["steps"] == 40
    assert meta["metrics"]["mse"]["last"] < meta["metrics"]["mse"]["first"], meta["metrics"]
    # Threshold at 5 % of 2 validation series: neither may score above it.
    assert max(meta["validation_series_scores"]) <= meta["threshold"] + 1e-4
    assert meta["preprocessing"]["window_center_hu"] == 50.0

    scorer = load_scorer(autoencoder)
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (3, 1, SIZE, SIZE)).astype(np.float32)
    m = (rng.uniform(size=(3, 1, SIZE, SIZE)) > 0.4).astype(np.float32)
    got = ort.InferenceSession(str(autoencoder / "autoencoder.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": x, "mask": m}
    )
    with torch.no_grad():
        want = [t.numpy() for t in scorer(torch.from_numpy(x), torch.from_numpy(m))]
    for g, w in zip(got, want):
        assert np.abs(g - w).max() / (np.abs(w).max() + 1e-12) < 1e-4


def test_evaluate_compares_every_method_localises_and_plots(run_dir: Path, autoencoder: Path, tmp_path: Path) -> None:
    model = untrained_detector(tmp_path / "model")
    ablation = untrained_detector(tmp_path / "ablation", conditioned=False, seed=1)
    report_dir = tmp_path / "report"
    assert (
        gatekeeper(
            [
                "evaluate",
                "detector",
                "--data",
                str(run_dir),
                "--model",
                str(model),
                "--ablation",
                str(ablation),
                "--autoencoder",
                str(autoencoder),
                "--out",
                str(report_dir),
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    report = json.loads((report_dir / "report.json").read_text())
    assert report["series"] == 4 and report["normal_series"] == 2
    methods = report["methods"]
    assert list(methods) == ["detector", "ablation", "autoencoder", "hu_histogram"]
    for name, m in methods.items():
        assert set(m["per_type"]) == {"tumor", "stent", "all"}, name
        for kind, v in m["per_type"].items():
            assert 0.0 <= v["auroc"] <= 1.0 and v["auroc_ci95"][0] <= v["auroc_ci95"][1], (name, kind)
        assert m["false_flag_rate_normals"] in (0.0, 0.5, 1.0)  # 2 unseen normals
    # The histogram was fitted on the train split only and thresholded on the validation split.
    fit = report["hu_histogram_fit"]
    assert fit["train_series"] == 3 and fit["train_slices"] == 30 and fit["threshold"] is not None
    # Localisation exists for every method with a residual map, per anomaly type.
    assert methods["hu_histogram"]["localisation"] is None
    for name in ("detector", "ablation", "autoencoder"):
        loc = methods[name]["localisation"]
        assert set(loc) == {"tumor", "stent", "all"} and loc["all"]["n"] == 2
        assert 0.0 <= loc["all"]["hit_rate"] <= 1.0 and 0.0 < loc["all"]["chance"] < 1.0
    # Paired differences to the detector; the ablation's drives the conditioning target.
    for name in ("ablation", "autoencoder", "hu_histogram"):
        d = report["differences"][name]["all"]
        assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
        assert d["excludes_zero"] == (d["ci95"][0] > 0 or d["ci95"][1] < 0)
    targets = {t["target"]: t for t in report["targets"]}
    assert targets["series AUROC >= 0.95 on fluid"]["met"] is None  # no fluid series in this split
    tumor_auroc = methods["detector"]["per_type"]["tumor"]["auroc"]
    assert targets["series AUROC >= 0.95 on tumor"]["met"] == (tumor_auroc >= 0.95)
    slices_localised = methods["detector"]["localisation"]["all"]["slice_hit_rate"]
    localisation = next(t for t in report["targets"] if t["target"].startswith("localisation"))
    assert localisation["value"] == slices_localised and localisation["met"] == (slices_localised >= 0.85)
    better = next(t for t in report["targets"] if t["target"].startswith("better than HU histogram"))
    assert better["met"] == all(report["differences"]["hu_histogram"][k]["ci95"][0] > 0 for k in ("tumor", "stent"))
    conditioning = next(t for t in report["targets"] if t["target"].startswith("conditioned better"))
    assert conditioning["met"] == (report["differences"]["ablation"]["all"]["ci95"][0] > 0)

    md = (report_dir / "report.md").read_text()
    for label in ("GAN detector", "GAN, unconditioned", "conv autoencoder", "HU histogram"):
        assert label in md
    assert "| tumor | 1 |" in md and "## Localisation" in md
    assert "series AUROC >= 0.95 on fluid: not evaluated" in md
    # stent, tumor, false flags, localisation, conditioning, better than the autoencoder and the histogram
    assert md.count("**met**") + md.count("**missed**") == 7
    for png in ("roc.png", "profiles.png", "heatmaps.png"):
        assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md


def test_a_matched_twin_carries_the_conditioning_target(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --ablation-twin the position condition is judged on the matched pair, not on --model."""
    model = untrained_detector(tmp_path / "model")
    twin = untrained_detector(tmp_path / "twin", seed=2)
    ablation = untrained_detector(tmp_path / "ablation", conditioned=False, seed=1)
    report_dir = tmp_path / "report"
    assert (
        gatekeeper(
            [
                "evaluate",
                "detector",
                "--data",
                str(run_dir),
                "--model",
                str(model),
                "--ablation",
                str(ablation),
                "--ablation-twin",
                str(twin),
                "--out",
                str(report_dir),
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    report = json.loads((report_dir / "report.json").read_text())
    assert list(report["methods"]) == ["detector", "twin", "ablation", "hu_histogram"]
    pair = report["differences"]["twin_minus_ablation"]["all"]
    twin_auroc = report["methods"]["twin"]["per_type"]["all"]["auroc"]
    ablation_auroc = report["methods"]["ablation"]["per_type"]["all"]["auroc"]
    assert pair["difference"] == pytest.approx(twin_auroc - ablation_auroc, abs=1e-3)
    conditioning = next(t for t in report["targets"] if "unconditioned ablation" in t["target"])
    assert conditioning["target"].startswith("the matched conditioned twin")
    assert conditioning["value"] == pair["difference"] and conditioning["met"] == (pair["ci95"][0] > 0)
    md = (report_dir / "report.md").read_text()
    assert "## The position condition on a matched pair" in md and "GAN, conditioned (ablation's recipe)" in md

    # A twin without its ablation, or an unconditioned twin, is refused with a one-line reason.
    for extra, reason in (
        (["--ablation-twin", str(twin)], "--ablation-twin needs --ablation"),
        (["--ablation", str(ablation), "--ablation-twin", str(ablation)], "is unconditioned"),
    ):
        capsys.readouterr()
        rc = gatekeeper(
            [
                "evaluate",
                "detector",
                "--data",
                str(run_dir),
                "--model",
                str(model),
                "--out",
                str(tmp_path / "r"),
                *extra,
            ]
        )
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert rc == 2 and reason in last, last


def test_anomaly_mask_on_the_model_grid_covers_the_affected_slices(run_dir: Path) -> None:
    from models.detector.evaluation.localisation import anomaly_mask_on_grid
    from service.phantom.truth import load_series

    manifest = json.loads((run_dir / "manifest.json").read_text())
    entry = next(e for e in manifest["series"] if e["anomaly"] and e["anomaly"]["type"] == "tumor")
    truth = load_series(run_dir, entry)
    grid = anomaly_mask_on_grid(run_dir / entry["folder"] / entry["anomaly"]["seg"], truth.sop_instance_uids, 32)
    assert grid.shape == (10, 32, 32)
    assert list(np.flatnonzero(grid.any(axis=(1, 2)))) == entry["anomaly"]["slices"]
    t = entry["anomaly"]["slices"][0]
    full = truth.anomaly[t]
    rows, cols = np.nonzero(full)
    assert grid[t, rows // 2, cols // 2].all()  # every anomalous 64² pixel lands in an anomalous 32² pixel
    assert grid[t].sum() <= full.sum()  # and the 2×2 shrink does not grow it


def test_evaluate_without_normal_training_series_is_a_usage_error(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = untrained_detector(tmp_path / "model")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no DICOM here")
    capsys.readouterr()
    rc = gatekeeper(
        [
            "evaluate",
            "detector",
            "--data",
            str(run_dir),
            "--model",
            str(model),
            "--out",
            str(tmp_path / "r"),
            "--train-data",
            str(empty),
        ]
    )
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err
    assert last.startswith("gatekeeper evaluate: error:") and "no normal training series" in last
