"""The liver DICOM-SEG: valid (dciodvfy), round-trips through highdicom, deterministic UIDs, strict inputs."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from service.dicom_seg import SERIES_DESCRIPTION, build_liver_seg
from service.phantom.canvas import Label
from service.phantom.generate import SeriesSpec, generate_series

ALGORITHM = {"algorithm_name": "CT Gatekeeper liver U-Net", "algorithm_version": "sha256:0123456789abcdef"}


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[pydicom.Dataset], np.ndarray]:
    """12 CT headers at 64² (liver on slices 4–11 only) and the ground-truth liver mask, in file order."""
    out = tmp_path_factory.mktemp("phantom")
    entry = generate_series(SeriesSpec(folder="s", patient_seed=3, series_seed=103, num_slices=12, matrix=64), out)
    folder = out / entry["folder"]
    headers = [pydicom.dcmread(folder / name, stop_before_pixels=True) for name in entry["files"]]
    organs = hd.seg.segread(folder / entry["organs_seg"])
    labels = organs.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in headers],
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    mask = labels == Label.LIVER
    assert mask[4:].any(axis=(1, 2)).all() and not mask[:4].any(), "the fixture needs slices without liver"
    return headers, mask


def dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy (Debian package dicom3tools) is not installed; run `make system-deps`")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_seg_passes_dciodvfy_and_round_trips(phantom_series, tmp_path: Path) -> None:
    headers, mask = phantom_series
    # Give the images in reverse order: the mask follows the list, not the position in space.
    headers, mask = headers[::-1], mask[::-1].copy()
    seg = build_liver_seg(source_images=headers, mask=mask, source_series_version=1, **ALGORITHM)
    path = tmp_path / "liver.seg.dcm"
    seg.save_as(path)
    assert dciodvfy_errors(path) == []

    back = hd.seg.segread(path)
    source_uids = [str(ds.SOPInstanceUID) for ds in headers]
    read_mask = back.get_pixels_by_source_instance(
        source_sop_instance_uids=source_uids, segment_numbers=[1], assert_missing_frames_are_empty=True
    )[..., 0].astype(bool)
    np.testing.assert_array_equal(read_mask, mask)

    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for series in back.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == set(source_uids)
    assert [str(s.SeriesInstanceUID) for s in back.ReferencedSeriesSequence] == [str(headers[0].SeriesInstanceUID)]
    assert back.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
    assert back.StudyInstanceUID == headers[0].StudyInstanceUID
    assert back.SegmentationType == "BINARY" and back.SeriesDescription == SERIES_DESCRIPTION
    [segment] = back.SegmentSequence
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SCT Liver
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    [algorithm] = segment.SegmentationAlgorithmIdentificationSequence
    assert algorithm.AlgorithmName == ALGORITHM["algorithm_name"]
    assert algorithm.AlgorithmVersion == ALGORITHM["algorithm_version"]
    assert back.NumberOfFrames == int(mask.any(axis=(1, 2)).sum())  # empty slices are omitted


def test_same_inputs_give_the_same_uids(phantom_series) -> None:
    headers, mask = phantom_series
    first = build_liver_seg(source_images=headers, mask=mask, source_series_version=1, **ALGORITHM)
    again = build_liver_seg(source_images=headers, mask=mask, source_series_version=1, **ALGORITHM)
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (first.SeriesInstanceUID, first.SOPInstanceUID)
    assert first.SeriesInstanceUID != first.SOPInstanceUID
    assert first.SeriesInstanceUID != headers[0].SeriesInstanceUID


def test_new_algorithm_version_or_series_version_gives_new_uids(phantom_series) -> None:
    headers, mask = phantom_series
    first = build_liver_seg(source_images=headers, mask=mask, source_series_version=1, **ALGORITHM)
    new_model = build_liver_seg(
        source_images=headers,
        mask=mask,
        source_series_version=1,
        algorithm_name=ALGORITHM["algorithm_name"],
        algorithm_version="sha256:fedcba",
    )
    new_series_version = build_liver_seg(source_images=headers, mask=mask, source_series_version=2, **ALGORITHM)
    uids = {seg.SOPInstanceUID for seg in (first, new_model, new_series_version)}
    series_uids = {seg.SeriesInstanceUID for seg in (first, new_model, new_series_version)}
    assert len(uids) == 3 and len(series_uids) == 3


def test_mask_with_wrong_number_of_slices_is_refused(phantom_series) -> None:
    headers, mask = phantom_series
    with pytest.raises(ValueError, match=r"mask has shape \(11, 64, 64\); expected \(12, 64, 64\)"):
        build_liver_seg(source_images=headers, mask=mask[:11], source_series_version=1, **ALGORITHM)


def test_mask_with_wrong_rows_and_columns_is_refused(phantom_series) -> None:
    headers, mask = phantom_series
    with pytest.raises(ValueError, match="mask has shape"):
        build_liver_seg(source_images=headers, mask=mask[:, :32], source_series_version=1, **ALGORITHM)


def test_mask_that_is_not_bool_is_refused(phantom_series) -> None:
    headers, mask = phantom_series
    with pytest.raises(ValueError, match="mask has dtype uint8; expected bool"):
        build_liver_seg(source_images=headers, mask=mask.astype(np.uint8), source_series_version=1, **ALGORITHM)


def test_images_of_two_series_are_refused(phantom_series) -> None:
    headers, mask = phantom_series
    other = copy.deepcopy(headers[-1])
    other.SeriesInstanceUID = pydicom.uid.generate_uid()
    with pytest.raises(ValueError, match="2 different SeriesInstanceUID values"):
        build_liver_seg(source_images=[*headers[:-1], other], mask=mask, source_series_version=1, **ALGORITHM)


def test_images_in_two_frames_of_reference_are_refused(phantom_series) -> None:
    headers, mask = phantom_series
    other = copy.deepcopy(headers[-1])
    other.FrameOfReferenceUID = pydicom.uid.generate_uid()
    with pytest.raises(ValueError, match="2 different FrameOfReferenceUID values"):
        build_liver_seg(source_images=[*headers[:-1], other], mask=mask, source_series_version=1, **ALGORITHM)


def test_no_source_images_is_refused(phantom_series) -> None:
    _, mask = phantom_series
    with pytest.raises(ValueError, match="source_images is empty"):
        build_liver_seg(source_images=[], mask=mask, source_series_version=1, **ALGORITHM)


def test_too_long_algorithm_version_is_refused(phantom_series) -> None:
    headers, mask = phantom_series
    with pytest.raises(ValueError, match="algorithm_version"):
        build_liver_seg(
            source_images=headers, mask=mask, source_series_version=1, algorithm_name="x", algorithm_version="v" * 65
        )


def test_series_version_zero_is_refused(phantom_series) -> None:
    headers, mask = phantom_series
    with pytest.raises(ValueError, match="source_series_version is 0; expected >= 1"):
        build_liver_seg(source_images=headers, mask=mask, source_series_version=0, **ALGORITHM)
