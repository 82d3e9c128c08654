"""Liver segmenter: contours from SEG and RTSTRUCT, a tiny training run with ONNX parity, the shipped model
through `gatekeeper segment` (SEG valid per dciodvfy, liver found), bad input, and the gate evaluation's metrics
(the evaluation itself: tests/test_gate_eval.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import onnxruntime as ort
import pydicom
import pytest

torch = pytest.importorskip("torch")

from models.segmenter.contours import find_liver_contours, read_liver_contour  # noqa: E402
from models.segmenter.evaluate_gate import Mahalanobis, aurc, optimal_aurc, review_outcome  # noqa: E402
from models.segmenter.network import SegmenterExport, UNet  # noqa: E402
from service import dicom_series  # noqa: E402
from service.commands.main import main as gatekeeper  # noqa: E402
from service.phantom.canvas import Label  # noqa: E402
from service.phantom.generate import SeriesSpec, generate_run  # noqa: E402
from service.phantom.truth import load_manifest, load_series  # noqa: E402
from service.segmentation import DEFAULT_MODEL_DIR, Segmenter, dice  # noqa: E402

torch.set_num_threads(1)


def _spec(
    folder: str, seed: int, split: str | None, anomaly: str | None = None, matrix: int = 64, slices: int = 14
) -> SeriesSpec:
    return SeriesSpec(
        folder=folder,
        patient_seed=seed,
        series_seed=seed + 1000,
        anomaly=anomaly,
        num_slices=slices,
        matrix=matrix,
        split=split,
    )


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with manifest splits: 3 train, 1 validation, 2 test (one normal, one tumor)."""
    out = tmp_path_factory.mktemp("segphantom")
    specs = [_spec(f"train/{i:04d}_normal", 300 + i, "train") for i in range(1, 4)]
    specs += [
        _spec("validation/0001_normal", 310, "validation"),
        _spec("test/0001_normal", 320, "test"),
        _spec("test/0002_tumor", 321, "test", "tumor"),
    ]
    generate_run(specs, out, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("segmodel")
    rc = gatekeeper(
        [
            "train",
            "segmenter",
            "--data",
            str(phantom),
            "--out",
            str(out),
            "--size",
            "32",
            "--base",
            "4",
            "--steps",
            "6",
            "--batch",
            "4",
            "--val-every",
            "3",
            "--seed",
            "3",
            "--jobs",
            "1",
            "--threads",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    return out


def test_seg_liver_segment_is_read_by_code_and_matches_the_ground_truth(phantom: Path) -> None:
    manifest = load_manifest(phantom)
    entry = manifest["series"][0]
    truth = load_series(phantom, entry)
    files = dicom_series.ct_series_in(dicom_series.scan_tree(phantom / entry["folder"]))[0]
    contour = read_liver_contour(phantom / entry["folder"] / entry["organs_seg"], files)
    assert contour.series_instance_uid == entry["series_instance_uid"]
    series = dicom_series.load_series(files)
    volume = contour.volume_for(series)
    assert volume.any()
    np.testing.assert_array_equal(volume, truth.labels == Label.LIVER)


def test_rtstruct_liver_is_rasterised_by_rt_utils_onto_the_ct_slices(phantom: Path, tmp_path: Path) -> None:
    from rt_utils import RTStructBuilder

    entry = load_manifest(phantom)["series"][0]
    ct_only = tmp_path / "ct"
    ct_only.mkdir()
    for name in entry["files"]:
        shutil.copy(phantom / entry["folder"] / name, ct_only / name)
    files = dicom_series.ct_series_in(dicom_series.scan_tree(ct_only))[0]
    series = dicom_series.load_series(files)
    truth = read_liver_contour(phantom / entry["folder"] / entry["organs_seg"], files).volume_for(series)
    rt = RTStructBuilder.create_new(dicom_series_path=str(ct_only))
    by_uid = dict(zip(series.sop_instance_uids, truth))
    order = [str(ds.SOPInstanceUID) for ds in rt.series_data]  # rt-utils' own slice order
    rt.add_roi(mask=np.stack([by_uid[u] for u in order], axis=-1), name="Liver")
    rt.save(str(tmp_path / "rtstruct.dcm"))
    contour = read_liver_contour(tmp_path / "rtstruct.dcm", files)
    got = contour.volume_for(series)
    assert dice(got, truth) > 0.9  # polygon round trip: boundary pixels may differ
    # The same file is found and matched by its referenced series when scanning the tree.
    shutil.copy(tmp_path / "rtstruct.dcm", ct_only / "rtstruct.dcm")
    found = find_liver_contours(dicom_series.scan_tree(ct_only))
    assert set(found) == {series.series_instance_uid}


def test_training_exports_onnx_that_matches_torch_and_a_complete_model_json(trained: Path) -> None:
    meta = json.loads((trained / "model.json").read_text())
    for key in ("format", "kind", "file", "input", "threshold", "segment", "version", "name", "metrics", "training"):
        assert key in meta, key
    assert meta["segment"]["code"] == "10200004"
    assert meta["training"]["seed"] == 3 and len(meta["training"]["data_hash"]) == 64
    assert meta["training"]["train_series"] == 3 and meta["training"]["validation_series"] == 1
    weights = torch.load(trained / "weights.pt", weights_only=False)
    net = UNet(in_channels=3, base=4)
    net.load_state_dict(weights["net"])
    wrapper = SegmenterExport(net.eval())
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(123))
    with torch.inference_mode():
        ref = [t.numpy() for t in wrapper(x)]
    got = ort.InferenceSession(str(trained / "segmenter.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": x.numpy()}
    )
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        assert np.abs(g - r).max() / (np.abs(r).max() + 1e-12) < 1e-4


def test_shipped_segmenter_writes_a_valid_seg_with_the_liver(phantom: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    generate_run([_spec("one", 777, None, matrix=128, slices=20)], run, progress=False)
    entry = load_manifest(run)["series"][0]
    out = tmp_path / "liver.seg.dcm"
    assert gatekeeper(["segment", str(run / "one"), "--out", str(out)]) == 0
    check = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True)
    errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], errors
    seg = hd.seg.segread(out)
    truth = load_series(run, entry)
    got = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(truth.sop_instance_uids),
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )[..., 0]
    assert dice(got.astype(bool), truth.labels == Label.LIVER) > 0.9
    meta = json.loads((DEFAULT_MODEL_DIR / "model.json").read_text())
    assert seg.SeriesDescription.endswith("UNREVIEWED")
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == meta["version"]


def test_shipped_segmenter_model_is_small_and_describes_itself() -> None:
    meta = json.loads((DEFAULT_MODEL_DIR / "model.json").read_text())
    size_mb = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()) / 1e6
    assert size_mb <= 20, size_mb
    assert meta["metrics"]["validation_dice_mean"] >= 0.9
    assert "gatekeeper train segmenter" in meta["training"]["command"]
    Segmenter(DEFAULT_MODEL_DIR)  # loads: the contract holds


@pytest.mark.parametrize("make", ["empty", "not_ct", "missing"])
def test_segment_bad_input_is_one_line_and_exit_2(
    make: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    if make != "missing":
        folder.mkdir()
    if make == "not_ct":
        ds = pydicom.Dataset()
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.Modality = "1.2.3", "1.2.3.4", "MR"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.save_as(folder / "mr.dcm", enforce_file_format=True)
    assert gatekeeper(["segment", str(folder), "--out", str(tmp_path / "x.dcm")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gatekeeper segment: error:" in err[0]
    assert not (tmp_path / "x.dcm").exists()


def test_aurc_review_and_mahalanobis_on_known_cases() -> None:
    risk = np.array([0.0, 0.0, 0.1, 0.5])
    assert aurc(risk, risk) == pytest.approx(optimal_aurc(risk))
    assert aurc(-risk, risk) > aurc(risk, risk)  # worst order first is worse
    failed = np.array([False, False, False, True])
    assert review_outcome(np.array([0.1, 0.2, 0.3, 0.9]), failed, 0.25)["recall"] == 1.0
    assert review_outcome(np.array([0.9, 0.2, 0.3, 0.1]), failed, 0.25)["recall"] == 0.0
    feats = np.random.default_rng(0).normal(size=(500, 4))
    m = Mahalanobis(feats)
    near, far = m.distance(np.zeros((1, 4))), m.distance(np.full((1, 4), 5.0))
    assert near[0] < 0.5 < 5 < far[0]
