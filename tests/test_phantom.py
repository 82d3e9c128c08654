"""The synthetic CT generator: valid DICOM, realistic HU, exact anomaly ground truth, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from service.cli import main
from service.phantom.anatomy import Label
from service.phantom.anomalies import ANOMALY_TYPES
from service.phantom.generate import SeriesSpec, count_slices, dataset_specs, generate_run
from service.phantom.truth import load_manifest, load_series

GATEKEEPER = [sys.executable, "-m", "service.cli"]


@pytest.fixture(scope="module")
def normal_run(tmp_path_factory) -> Path:
    """Two normal series at 256², one from the lungs down, with default noise."""
    out = tmp_path_factory.mktemp("normal")
    specs = [
        SeriesSpec(folder="a", patient_seed=11, series_seed=101, num_slices=48, matrix=256),
        SeriesSpec(folder="b", patient_seed=12, series_seed=102, num_slices=48, matrix=256),
    ]
    generate_run(specs, out, progress=False)
    return out


@pytest.fixture(scope="module")
def anomaly_run(tmp_path_factory) -> Path:
    """One series per anomaly type at 128², through the command line as a user would."""
    out = tmp_path_factory.mktemp("anomalies")
    specs = [
        SeriesSpec(
            folder=f"{i:02d}_{name}", patient_seed=200 + i, series_seed=300 + i, anomaly=name, num_slices=40, matrix=128
        )
        for i, name in enumerate(ANOMALY_TYPES)
    ]
    generate_run(specs, out, progress=False)
    return out


def test_cli_writes_series_folders_and_manifest(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "phantom",
            "--out",
            str(out),
            "--series",
            "2",
            "--slices",
            "12",
            "--seed",
            "4",
            "--anomaly",
            "stent",
            "--matrix",
            "96",
            "--quiet",
        ]
    )
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["series"]) == 2
    printed = capsys.readouterr().out
    for entry in manifest["series"]:
        folder = out / entry["folder"]
        assert len(list(folder.glob("CT*.dcm"))) == 12 == entry["geometry"]["num_slices"]
        assert (folder / "ground_truth" / "organs.seg.dcm").is_file()
        assert (folder / "ground_truth" / "anomaly.seg.dcm").is_file()
        assert entry["anomaly"]["type"] == "stent" and entry["anomaly"]["slices"]
        assert entry["folder"] in printed
    assert manifest["series"][0]["patient_seed"] != manifest["series"][1]["patient_seed"]


def test_same_seed_writes_identical_files(tmp_path):
    for name in ("a", "b"):
        main(["phantom", "--out", str(tmp_path / name), "--slices", "3", "--seed", "9", "--matrix", "64", "--quiet"])
    first = sorted((tmp_path / "a").rglob("CT*.dcm"))
    assert len(first) == 3
    for path in first:  # pixels, UIDs, headers: byte for byte
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
    seg_a, seg_b = (pydicom.dcmread(tmp_path / n / "0001_normal/ground_truth/organs.seg.dcm") for n in "ab")
    assert seg_a.SOPInstanceUID == seg_b.SOPInstanceUID  # highdicom stamps its own creation time


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_ct_and_seg_files_pass_dciodvfy_with_zero_errors(normal_run, anomaly_run):
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy (Debian package dicom3tools) is not installed; run `make test`, which installs it")
    sample = sorted(normal_run.glob("a/CT*.dcm"))[::16] + sorted(anomaly_run.glob("*_tumor/CT*.dcm"))[:1]
    sample += [normal_run / "a/ground_truth/organs.seg.dcm"]
    sample += sorted(anomaly_run.glob("*/ground_truth/anomaly.seg.dcm"))[:2]
    assert len(sample) >= 6
    for path in sample:
        assert _dciodvfy_errors(path) == [], path


def test_series_headers_are_consistent(normal_run):
    entry = load_manifest(normal_run)["series"][0]
    datasets = [pydicom.dcmread(normal_run / entry["folder"] / f) for f in entry["files"]]
    for key in (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
        "ImageOrientationPatient",
        "PixelSpacing",
        "RescaleSlope",
        "RescaleIntercept",
        "PatientID",
    ):
        assert len({str(ds.get(key)) for ds in datasets}) == 1, key
    assert str(datasets[0].SeriesInstanceUID) == entry["series_instance_uid"]
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])
    assert np.allclose(np.diff(z), -entry["geometry"]["spacing_between_slices_mm"], atol=1e-3)
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, len(datasets) + 1))
    spacing = float(datasets[0].PixelSpacing[0])
    assert 0.6 <= spacing * datasets[0].Columns / 512 <= 0.9  # the 512² equivalent
    assert 1.25 <= float(datasets[0].SliceThickness) <= 5.0
    assert datasets[0].PatientPosition == "HFS" and datasets[0].Modality == "CT"


def _organ_median(truth, label: Label, erode: int = 2) -> float:
    mask = ndimage.binary_erosion(truth.labels == label, iterations=erode)
    assert mask.sum() > 50, f"{label.name} barely present"
    return float(np.median(truth.hu[mask]))


def test_anatomy_hu_matches_clinical_ranges(normal_run):
    truth = load_series(normal_run, load_manifest(normal_run)["series"][0])
    assert 95 <= _organ_median(truth, Label.LIVER) <= 130  # portal venous liver ≈ 110 HU
    assert 100 <= _organ_median(truth, Label.SPLEEN) <= 140
    assert 140 <= _organ_median(truth, Label.AORTA, erode=1) <= 190
    bone = truth.hu[truth.labels == Label.BONE]
    assert np.percentile(bone, 95) >= 700  # cortical bone 700–1500 HU
    assert np.percentile(bone, 99.9) <= 1600
    air = truth.hu[:, :3, :3]  # image corners are outside the body
    assert np.all(air <= -900)
    # Subcutaneous fat: body pixels between skin and muscle. Take the body's outer ring at mid-level.
    mid = truth.hu[len(truth.hu) // 2]
    fat = mid[(mid > -160) & (mid < -40)]
    assert fat.size > 500 and -115 <= np.median(fat) <= -85
    water_like = truth.hu[(truth.labels == Label.GALLBLADDER) | (truth.labels == Label.URINARY_BLADDER)]
    if water_like.size > 50:
        assert -10 <= np.median(water_like) <= 25


def test_lung_bases_at_top_and_liver_comes_and_goes(tmp_path):
    # A long scan from the lower chest to the pelvis, so both ends of the liver are in it.
    spec = SeriesSpec(folder="long", patient_seed=5, series_seed=55, num_slices=90, matrix=96)
    generate_run([spec], tmp_path, progress=False)
    truth = load_series(tmp_path, load_manifest(tmp_path)["series"][0])
    u = np.array(truth.entry["geometry"]["anatomical_position"])
    liver_area = (truth.labels == Label.LIVER).sum(axis=(1, 2))
    lung_area = (truth.labels == Label.LUNG).sum(axis=(1, 2))
    lungs = truth.hu[truth.labels == Label.LUNG]
    assert -900 <= np.median(lungs) <= -780
    assert lung_area[0] > 0 and lung_area[-1] == 0  # lungs at the top only
    present = np.flatnonzero(liver_area)
    assert present.size and liver_area[-1] == 0  # the liver ends before the scan does
    assert liver_area.argmax() < len(u) - 1
    assert truth.entry["liver_slices"] == [int(i) for i in present]
    assert np.all(np.diff(u) > 0)  # head → feet


@pytest.mark.parametrize("name", ANOMALY_TYPES)
def test_anomaly_mask_is_nonempty_exactly_on_manifest_slices(anomaly_run, name):
    entry = next(e for e in load_manifest(anomaly_run)["series"] if e["anomaly"]["type"] == name)
    truth = load_series(anomaly_run, entry)
    assert truth.anomaly is not None
    nonempty = [int(i) for i in np.flatnonzero(truth.anomaly.any(axis=(1, 2)))]
    assert nonempty and nonempty == entry["anomaly"]["slices"]
    mask = truth.anomaly
    liver = truth.labels == Label.LIVER
    if name == "tumor":
        assert np.all(liver[mask])  # a tumour inside the liver is liver
        lesion, rest = np.median(truth.hu[mask]), np.median(truth.hu[liver & ~mask])
        assert abs(lesion - rest) > 20
    elif name == "fluid":
        assert not np.any(liver[mask])
        assert -15 <= np.median(truth.hu[mask]) <= 35
    elif name in ("stent", "hip_prosthesis"):
        assert truth.hu[mask].max() > 2000  # metal
    elif name == "low_dose":
        assert len(nonempty) == len(truth.hu)
    elif name == "contrast_phase":
        assert np.median(truth.hu[ndimage.binary_erosion(liver, iterations=1)]) < 85  # unenhanced liver ≈ 60


def test_low_dose_series_is_noisier_than_normal(anomaly_run, tmp_path):
    entry = next(e for e in load_manifest(anomaly_run)["series"] if e["anomaly"]["type"] == "low_dose")
    normal = SeriesSpec(
        folder="n", patient_seed=entry["patient_seed"], series_seed=entry["series_seed"], num_slices=40, matrix=128
    )
    generate_run([normal], tmp_path, progress=False)
    noisy = load_series(anomaly_run, entry)
    clean = load_series(tmp_path, load_manifest(tmp_path)["series"][0])
    liver = ndimage.binary_erosion(clean.labels == Label.LIVER, iterations=2)
    assert liver.sum() > 100
    assert np.std(noisy.hu[liver]) > 2.0 * np.std(clean.hu[liver])


def test_dataset_protocol_counts_and_disjoint_patients():
    standard = dataset_specs(seed=0, large=False, num_slices=None, matrix=512, noise_sigma=12)
    large = dataset_specs(seed=0, large=True, num_slices=None, matrix=512, noise_sigma=12)
    by_split: dict[str, list[SeriesSpec]] = {}
    for spec in standard:
        by_split.setdefault(spec.split, []).append(spec)
    assert {k: len(v) for k, v in by_split.items()} == {"train": 96, "validation": 10, "test": 50}
    assert all(s.anomaly is None for s in by_split["train"] + by_split["validation"])
    test_anomalies = [s.anomaly for s in by_split["test"]]
    assert test_anomalies.count(None) == 25
    assert {a for a in test_anomalies if a} == set(ANOMALY_TYPES)
    patients = [s.patient_seed for s in standard + large]
    assert len(set(patients)) == len(patients)  # every synthetic patient in one split only
    assert len(large) >= 300 and {s.anomaly for s in large} == {None, *ANOMALY_TYPES}
    again = dataset_specs(seed=0, large=False, num_slices=None, matrix=512, noise_sigma=12)
    assert again == standard


def test_every_protocol_series_has_a_scan_that_fits_its_patient():
    # Realistic scan ranges (no --slices) must fit small patients too: plan every geometry.
    for large in (False, True):
        for spec in dataset_specs(seed=0, large=large, num_slices=None, matrix=512, noise_sigma=12):
            assert 8 <= count_slices(spec) <= 400, spec.folder


@pytest.mark.parametrize(
    "args, message",
    [
        (["--slices", "-3"], "--slices must be >= 1"),
        (["--anomaly", "banana"], "unknown --anomaly 'banana'"),
        (["--series", "0"], "--series must be >= 1"),
        (["--large"], "--large and --split apply to"),
        (["--slices", "abc"], "invalid int value"),
        (["--slices", "5000"], "ask for fewer slices"),
    ],
)
def test_bad_options_end_with_one_line_and_exit_code_2(tmp_path, args, message):
    result = subprocess.run(
        [*GATEKEEPER, "phantom", "--out", str(tmp_path / "o"), *args, "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_non_empty_output_folder_needs_force(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    base = [*GATEKEEPER, "phantom", "--out", str(out), "--slices", "2", "--matrix", "64", "--quiet"]
    result = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not empty" in result.stderr
    # --force never deletes a folder that is not an earlier phantom run.
    result = subprocess.run([*base, "--force"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and (out / "notes.txt").read_text() == "mine"
    # An earlier phantom run is replaced with --force.
    (out / "notes.txt").unlink()
    assert subprocess.run(base, capture_output=True, timeout=120).returncode == 0
    assert subprocess.run(base, capture_output=True, timeout=120).returncode == 2
    assert subprocess.run([*base, "--force"], capture_output=True, timeout=120).returncode == 0
