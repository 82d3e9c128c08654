"""service.dicom_series: grouping, ordering and one test per way a series can be unusable."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from service import dicom_series
from service.commands.main import main as gatekeeper
from service.dicom_series import SeriesError


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 5-slice phantom series (with its DICOM-SEG ground truth beside it)."""
    out = tmp_path_factory.mktemp("phantom")
    assert (
        gatekeeper(
            ["phantom", "--out", str(out), "--series", "1", "--slices", "5", "--matrix", "64", "--seed", "3", "--quiet"]
        )
        == 0
    )
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


def _ct_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("CT*.dcm"))


def _copy_cts(src: Path, dst: Path, files: list[Path] | None = None) -> Path:
    dst.mkdir(parents=True)
    for f in files if files is not None else _ct_files(src):
        shutil.copy(f, dst / f.name)
    return dst


def test_series_is_grouped_ordered_and_seg_ignored_whatever_the_file_names(
    phantom_series: Path, tmp_path: Path
) -> None:
    names = _ct_files(phantom_series)
    shuffled = tmp_path / "export"
    shuffled.mkdir()
    order = list(range(len(names)))
    random.Random(1).shuffle(order)
    for new, old in enumerate(order):  # file names no longer follow the body axis
        shutil.copy(names[old], shuffled / f"IMG{new:03d}")
    shutil.copytree(phantom_series / "ground_truth", shuffled / "ground_truth")
    (shuffled / "README.txt").write_text("not DICOM")

    groups = dicom_series.scan_tree(shuffled)
    assert len(groups) >= 2  # the CT series and at least one SEG series
    (series,) = dicom_series.read_ct_series(shuffled)
    assert series.num_slices == len(names)
    assert np.all(np.diff(series.locations_mm) < 0), "head → feet means decreasing location along +z"
    expected = [pydicom.dcmread(n, stop_before_pixels=True).SOPInstanceUID for n in names]  # CT000001 = head-most
    assert list(series.sop_instance_uids) == expected
    first = pydicom.dcmread(names[0])
    hu0 = first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    np.testing.assert_allclose(series.hu[0], hu0)
    assert series.hu.min() < -900 and series.hu.max() > 100  # air and tissue in HU


def test_series_with_one_slice_is_refused(phantom_series: Path, tmp_path: Path) -> None:
    folder = _copy_cts(phantom_series, tmp_path / "one", _ct_files(phantom_series)[:1])
    with pytest.raises(SeriesError, match="1 slice"):
        dicom_series.read_ct_series(folder)


def test_non_ct_series_is_refused(phantom_series: Path) -> None:
    (seg,) = [g for g in dicom_series.scan_tree(phantom_series / "ground_truth") if "organ" in str(g.instances[0].path)]
    with pytest.raises(SeriesError, match="not a CT image series .*SEG"):
        dicom_series.load_series(seg)


def test_series_with_mixed_sizes_is_refused(phantom_series: Path, tmp_path: Path) -> None:
    folder = _copy_cts(phantom_series, tmp_path / "mixed")
    victim = _ct_files(folder)[2]
    ds = pydicom.dcmread(victim)
    ds.Rows, ds.Columns = 32, 32
    ds.PixelData = np.zeros((32, 32), np.uint16).tobytes()
    ds.save_as(victim)
    with pytest.raises(SeriesError, match="2 different sizes"):
        dicom_series.read_ct_series(folder)


def test_series_with_unreadable_pixels_is_refused(phantom_series: Path, tmp_path: Path) -> None:
    folder = _copy_cts(phantom_series, tmp_path / "broken")
    victim = _ct_files(folder)[1]
    ds = pydicom.dcmread(victim)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # truncated pixel data
    ds.save_as(victim)
    with pytest.raises(SeriesError, match=f"unreadable pixels in {victim.name}"):
        dicom_series.read_ct_series(folder)


def test_series_with_infinite_hu_is_refused(phantom_series: Path, tmp_path: Path) -> None:
    folder = _copy_cts(phantom_series, tmp_path / "inf")
    victim = _ct_files(folder)[3]
    ds = pydicom.dcmread(victim)
    ds.RescaleSlope = "1e38"  # stored values × 1e38 overflow float32
    ds.save_as(victim)
    with pytest.raises(SeriesError, match=f"NaN or infinite HU after decoding in {victim.name}"):
        dicom_series.read_ct_series(folder)


def test_series_with_duplicate_positions_is_refused(phantom_series: Path, tmp_path: Path) -> None:
    folder = _copy_cts(phantom_series, tmp_path / "dup")
    a, b = _ct_files(folder)[:2]
    ds = pydicom.dcmread(b)
    ds.ImagePositionPatient = pydicom.dcmread(a).ImagePositionPatient
    ds.save_as(b)
    with pytest.raises(SeriesError, match="same position"):
        dicom_series.read_ct_series(folder)


def test_folder_without_ct_names_the_problem(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SeriesError, match="no CT image series"):
        dicom_series.read_ct_series(tmp_path)
