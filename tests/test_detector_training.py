"""CI smoke run of the detector: tiny phantom data → train → export → `gatekeeper score` on good and bad series."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
import pytest

torch = pytest.importorskip("torch")

from models.detector.stylegan2.export import load_scorer  # noqa: E402
from service.commands.main import main as gatekeeper  # noqa: E402

torch.set_num_threads(1)  # fastest on a shared 2-core machine
SIZE = 64


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight normal 12-slice series (no manifest splits: the trainer holds out validation series itself)."""
    out = tmp_path_factory.mktemp("phantom")
    assert (
        gatekeeper(
            [
                "phantom",
                "--out",
                str(out),
                "--series",
                "8",
                "--slices",
                "12",
                "--matrix",
                "64",
                "--seed",
                "11",
                "--quiet",
            ]
        )
        == 0
    )
    (out / "manifest.json").unlink()  # like a PACS export: just DICOM folders
    return out


@pytest.fixture(scope="module")
def trained(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("model")
    t0 = time.monotonic()
    rc = gatekeeper(
        [
            "train",
            "detector",
            "--data",
            str(phantom),
            "--out",
            str(out),
            "--size",
            str(SIZE),
            "--family",
            "dcgan",
            "--position-steps",
            "40",
            "--gan-steps",
            "30",
            "--encoder-steps",
            "80",
            "--batch",
            "16",
            "--seed",
            "5",
            "--jobs",
            "1",
            "--threads",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    return out, time.monotonic() - t0


def test_smoke_training_losses_fall_and_model_json_is_complete(trained: tuple[Path, float]) -> None:
    # No wall-time bound here: speed is measured by `gatekeeper bench`, not by a test on a noisy machine.
    out, _ = trained
    meta = json.loads((out / "model.json").read_text())
    for key in (
        "size",
        "kappa",
        "aggregation",
        "threshold",
        "preprocessing",
        "position",
        "normalisation",
        "files",
        "training",
        "versions",
        "metrics",
    ):
        assert key in meta, key
    assert meta["size"] == SIZE and meta["position"]["method"] == "bpr"
    assert meta["training"]["steps"] == {"position": 40, "gan": 30, "encoder": 80}
    assert len(meta["training"]["data_hash_sha256"]) == 64
    assert meta["training"]["validation_series"] >= 2
    enc, pos = meta["metrics"]["encoder_loss"], meta["metrics"]["position_loss"]
    assert enc["last"] < enc["first"], f"izi_f encoder loss did not fall: {enc}"
    assert pos["last"] < pos["first"], f"body-part-regression loss did not fall: {pos}"
    assert np.isfinite(meta["threshold"])
    for name in meta["files"].values():
        assert (out / name).stat().st_size > 10_000
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert {"G", "D", "G_ema", "E", "P", "optimizers", "step", "args"} <= set(ckpt)


def test_exported_scorer_matches_trained_weights(trained: tuple[Path, float]) -> None:
    out, _ = trained
    scorer = load_scorer(out, torch.device("cpu"))
    rng = np.random.default_rng(123)
    x = rng.uniform(-1, 1, (3, 1, SIZE, SIZE)).astype(np.float32)
    p = rng.uniform(0, 1, 3).astype(np.float32)
    m = (rng.uniform(size=(3, 1, SIZE, SIZE)) > 0.5).astype(np.float32)
    got = ort.InferenceSession(str(out / "scorer.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": x, "position": p, "mask": m}
    )
    with torch.no_grad():
        want = [t.numpy() for t in scorer(torch.from_numpy(x), torch.from_numpy(p), torch.from_numpy(m))]
    for g, w in zip(got, want):
        assert np.abs(g - w).max() / (np.abs(w).max() + 1e-12) < 1e-4


def test_resume_continues_from_the_checkpoint(phantom: Path, trained: tuple[Path, float], tmp_path: Path) -> None:
    out, _ = trained
    copy = tmp_path / "model"
    shutil.copytree(out, copy)
    assert gatekeeper(["train", "detector", "--data", str(phantom), "--out", str(copy), "--size", str(SIZE)]) == 2
    rc = gatekeeper(
        [
            "train",
            "detector",
            "--data",
            str(phantom),
            "--out",
            str(copy),
            "--size",
            str(SIZE),
            "--family",
            "dcgan",
            "--position-steps",
            "40",
            "--gan-steps",
            "30",
            "--encoder-steps",
            "90",
            "--batch",
            "16",
            "--seed",
            "5",
            "--jobs",
            "1",
            "--threads",
            "1",
            "--resume",
            "--no-progress",
        ]
    )
    assert rc == 0
    meta = json.loads((copy / "model.json").read_text())
    assert meta["training"]["steps"] == {"position": 40, "gan": 30, "encoder": 90}


def _one_slice(src: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy(sorted(src.glob("CT*.dcm"))[0], dst)
    return dst


def _mixed_sizes(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ground_truth"))
    victim = sorted(dst.glob("CT*.dcm"))[4]
    ds = pydicom.dcmread(victim)
    ds.Rows, ds.Columns = 48, 48
    ds.PixelData = np.zeros((48, 48), np.uint16).tobytes()
    ds.save_as(victim)
    return dst


def test_score_reports_good_series_and_names_each_bad_one(
    trained: tuple[Path, float], phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = trained
    good = sorted(p for p in phantom.iterdir() if p.is_dir())[:2]
    bad = {
        "one": _one_slice(good[0], tmp_path / "one"),
        "seg": good[0] / "ground_truth",
        "mixed": _mixed_sizes(good[1], tmp_path / "mixed"),
    }
    capsys.readouterr()
    rc = gatekeeper(["score", *map(str, good), *map(str, bad.values()), "--model", str(out), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 1  # at least one series could not be scored
    by_folder: dict[str, list[dict]] = {}
    for r in doc["series"]:
        by_folder.setdefault(r["folder"], []).append(r)
    meta = json.loads((out / "model.json").read_text())
    for folder in good:
        (r,) = by_folder[str(folder)]
        assert r["error"] is None
        assert r["threshold"] == pytest.approx(meta["threshold"], rel=1e-5)
        assert r["flagged"] == (r["score"] > r["threshold"])
        assert len(r["slices"]) == 12
        positions = [s["position"] for s in r["slices"]]
        assert positions == sorted(positions), "slices are head → feet, positions must grow"
        uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in sorted(folder.glob("CT*.dcm"))]
        assert [s["sop_instance_uid"] for s in r["slices"]] == uids
        assert all(np.isfinite(s["score"]) for s in r["slices"])
    assert "1 slice" in by_folder[str(bad["one"])][0]["error"]
    assert all("not a CT image series" in r["error"] for r in by_folder[str(bad["seg"])])
    assert "different sizes" in by_folder[str(bad["mixed"])][0]["error"]

    rc = gatekeeper(["score", str(good[0]), "--model", str(out)])
    assert rc == 0 and good[0].name not in capsys.readouterr().err


def test_evaluate_reports_auroc_per_anomaly_type(trained: tuple[Path, float], phantom: Path, tmp_path: Path) -> None:
    out, _ = trained
    data = tmp_path / "data"
    assert (
        gatekeeper(
            [
                "phantom",
                "--out",
                str(data / "stent"),
                "--series",
                "1",
                "--slices",
                "12",
                "--matrix",
                "64",
                "--seed",
                "12",
                "--anomaly",
                "stent",
                "--quiet",
            ]
        )
        == 0
    )
    entries = json.loads((data / "stent" / "manifest.json").read_text())["series"]
    for e in entries:
        e["folder"], e["split"] = f"stent/{e['folder']}", "test"
    from service import dicom_series

    for folder in sorted(p for p in phantom.iterdir() if p.is_dir())[:3]:
        shutil.copytree(folder, data / "normal" / folder.name)
        (group,) = dicom_series.ct_series_in(dicom_series.scan_tree(data / "normal" / folder.name))
        entries.append(
            {
                "folder": f"normal/{folder.name}",
                "split": "test",
                "anomaly": None,
                "series_instance_uid": group.series_instance_uid,
            }
        )
    (data / "manifest.json").write_text(json.dumps({"series": entries}))
    report_dir = tmp_path / "report"
    assert (
        gatekeeper(
            [
                "evaluate",
                "detector",
                "--data",
                str(data),
                "--model",
                str(out),
                "--out",
                str(report_dir),
                "--train-data",
                str(phantom),
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    report = json.loads((report_dir / "report.json").read_text())
    assert report["series"] == 4 and set(report["per_type"]) == {"stent", "all"}
    assert 0.0 <= report["per_type"]["stent"]["auroc"] <= 1.0
    assert 0.0 <= report["slice_auroc"] <= 1.0 and 0.0 <= report["false_flag_rate_normals"] <= 1.0
    assert "| stent | 1 |" in (report_dir / "report.md").read_text()


def test_reexport_from_weights_gives_the_same_graphs(trained: tuple[Path, float], tmp_path: Path) -> None:
    from models.detector.stylegan2.export import reexport

    out, _ = trained
    copy = tmp_path / "m"
    copy.mkdir()
    for name in ("model.json", "weights.pt", "scorer.onnx"):
        shutil.copy(out / name, copy / name)
    written = {p.name for p in reexport(copy)}
    assert {"encoder.onnx", "generator.onnx", "discriminator.onnx", "position.onnx", "scorer.onnx"} <= written
    rng = np.random.default_rng(9)
    feeds = {
        "image": rng.uniform(-1, 1, (2, 1, SIZE, SIZE)).astype(np.float32),
        "position": rng.uniform(0, 1, 2).astype(np.float32),
    }
    for name in ("encoder.onnx", "discriminator.onnx"):
        a = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"]).run(None, feeds)
        b = ort.InferenceSession(str(copy / name), providers=["CPUExecutionProvider"]).run(None, feeds)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
