"""The liver RT Structure Set: contours of a 2-D mask, valid per dciodvfy, rasterised back by rt-utils
(Dice against the mask it came from), references, deterministic UIDs, strict inputs; `gatekeeper
segment --format rtstruct`; and the settings that choose it."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from test_dicom_seg import dciodvfy_errors

from service.commands.main import main as gatekeeper
from service.dicom_rtstruct import (
    SERIES_DESCRIPTION,
    build_liver_rtstruct,
    mask_contours,
    rtstruct_uids,
)
from service.dicom_seg import seg_uids
from service.phantom.canvas import Label
from service.phantom.generate import SeriesSpec, generate_series
from service.settings import Settings

ALGORITHM = {"algorithm_name": "CT Gatekeeper liver U-Net", "algorithm_version": "sha256:0123456789abcdef"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def even_odd_fill(contours: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside an odd number of (row, column) polygons (crossing-number test)."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    inside = np.zeros(shape, bool)
    for polygon in contours:
        crossings = np.zeros(shape, bool)
        for (r0, c0), (r1, c1) in zip(polygon, np.roll(polygon, -1, axis=0), strict=True):
            straddles = (r0 > rows) != (r1 > rows)
            with np.errstate(divide="ignore", invalid="ignore"):
                at = c0 + (rows - r0) * (c1 - c0) / (r1 - r0)
            crossings ^= straddles & (cols < at)
        inside ^= crossings
    return inside


# --- contours of a 2-D mask -------------------------------------------------------------------------


def test_one_pixel_is_one_contour_around_its_centre() -> None:
    mask = np.zeros((5, 5), bool)
    mask[2, 3] = True
    [contour] = mask_contours(mask)
    assert len(contour) == 4
    assert np.allclose(contour.mean(axis=0), (2, 3))
    assert np.abs(contour - (2, 3)).max() < 0.5  # within the pixel


def test_square_is_one_contour_of_four_corners_cut_diagonally() -> None:
    mask = np.zeros((10, 10), bool)
    mask[2:6, 3:8] = True
    [contour] = mask_contours(mask)
    assert len(contour) == 8  # four sides, four cut corners: collinear points are dropped
    np.testing.assert_array_equal(even_odd_fill([contour], mask.shape), mask)


def test_ring_gives_a_contour_for_the_region_and_one_for_its_hole() -> None:
    mask = np.zeros((12, 12), bool)
    mask[2:10, 2:10] = True
    mask[5:7, 4:8] = False
    contours = mask_contours(mask)
    assert len(contours) == 2
    np.testing.assert_array_equal(even_odd_fill(contours, mask.shape), mask)


def test_islands_and_pixels_touching_at_a_corner_are_separate_contours() -> None:
    mask = np.zeros((10, 10), bool)
    mask[1:3, 1:3] = True
    mask[6:9, 5:9] = True
    mask[3, 3] = True  # touches the first island at a corner only
    contours = mask_contours(mask)
    assert len(contours) == 3
    np.testing.assert_array_equal(even_odd_fill(contours, mask.shape), mask)


def test_region_on_the_image_border_is_closed_along_it() -> None:
    mask = np.zeros((6, 6), bool)
    mask[:, :2] = True
    [contour] = mask_contours(mask)
    assert contour[:, 1].min() == pytest.approx(-0.4) and contour[:, 0].min() == pytest.approx(-0.4)
    np.testing.assert_array_equal(even_odd_fill([contour], mask.shape), mask)


@pytest.mark.parametrize("seed", range(6))
def test_random_masks_come_back_exactly_from_their_contours(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((24, 31)) < (0.3 + 0.08 * seed)
    contours = mask_contours(mask)
    np.testing.assert_array_equal(even_odd_fill(contours, mask.shape), mask)


def test_empty_mask_has_no_contours_and_a_3d_mask_is_refused() -> None:
    assert mask_contours(np.zeros((4, 4), bool)) == []
    with pytest.raises(ValueError, match="expected a 2-D bool array"):
        mask_contours(np.zeros((2, 4, 4), bool))


# --- the structure set ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[pydicom.Dataset], np.ndarray]:
    """A 16-slice 96² phantom: its folder, CT headers in file order and the ground-truth liver mask."""
    out = tmp_path_factory.mktemp("phantom")
    entry = generate_series(SeriesSpec(folder="s", patient_seed=3, series_seed=103, num_slices=16, matrix=96), out)
    folder = out / entry["folder"]
    headers = [pydicom.dcmread(folder / name, stop_before_pixels=True) for name in entry["files"]]
    organs = hd.seg.segread(folder / entry["organs_seg"])
    labels = organs.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in headers],
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    mask = labels == Label.LIVER
    assert mask.any(axis=(1, 2)).sum() >= 4 and not mask.any(axis=(1, 2)).all(), "want slices with and without liver"
    for name in entry["files"]:  # the CT only: rt-utils reads every file with pixels as the series
        (out / "ct").mkdir(exist_ok=True)
        (out / "ct" / name).write_bytes((folder / name).read_bytes())
    return out / "ct", headers, mask


def rasterise_with_rt_utils(ct_folder: Path, rtstruct_path: Path, roi_name: str) -> dict[str, np.ndarray]:
    """The ROI rasterised onto the CT by rt-utils (OpenCV fillPoly), per CT SOP Instance UID."""
    rt_utils = pytest.importorskip("rt_utils")
    rt = rt_utils.RTStructBuilder.create_from(dicom_series_path=str(ct_folder), rt_struct_path=str(rtstruct_path))
    volume = rt.get_roi_mask_by_name(roi_name)  # [rows, columns, slices] in rt-utils' slice order
    return {str(ds.SOPInstanceUID): volume[:, :, i] for i, ds in enumerate(rt.series_data)}


def test_rtstruct_passes_dciodvfy_and_rt_utils_gives_the_mask_back(phantom_series, tmp_path: Path) -> None:
    ct_folder, headers, mask = phantom_series
    # Give the images in reverse order: the mask follows the list, not the position in space.
    headers, mask = headers[::-1], mask[::-1].copy()
    rtstruct = build_liver_rtstruct(source_images=headers, mask=mask, source_series_version=1, **ALGORITHM)
    path = tmp_path / "liver.rtstruct.dcm"
    rtstruct.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []

    by_uid = rasterise_with_rt_utils(ct_folder, path, "Liver")
    back = np.stack([by_uid[str(ds.SOPInstanceUID)] for ds in headers])
    score = dice(back, mask)
    print(f"rt-utils Dice vs the phantom's ground-truth liver: {score:.4f} ({int(mask.sum())} pixels)")
    assert score >= 0.98


def test_rtstruct_of_a_blocky_mask_with_holes_comes_back_through_rt_utils(phantom_series, tmp_path: Path) -> None:
    ct_folder, headers, truth = phantom_series
    rng = np.random.default_rng(7)
    mask = np.zeros_like(truth)
    mask[3:-3, 20:70, 15:60] = rng.random((len(truth) - 6, 50, 45)) < 0.85  # islands, holes, corners
    path = tmp_path / "blocky.dcm"
    build_liver_rtstruct(
        source_images=headers, mask=mask, source_series_version=1, roi_name="LIVER_AUTO", **ALGORITHM
    ).save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    by_uid = rasterise_with_rt_utils(ct_folder, path, "LIVER_AUTO")
    back = np.stack([by_uid[str(ds.SOPInstanceUID)] for ds in headers])
    score = dice(back, mask)
    print(f"rt-utils Dice vs a random blocky mask: {score:.4f}")
    assert score >= 0.98


def test_rtstruct_references_every_ct_image_and_puts_contours_on_their_planes(phantom_series) -> None:
    _, headers, mask = phantom_series
    ds = build_liver_rtstruct(source_images=headers, mask=mask, source_series_version=1, **ALGORITHM)
    assert ds.Modality == "RTSTRUCT" and ds.SOPClassUID == pydicom.uid.RTStructureSetStorage
    assert ds.SeriesDescription == SERIES_DESCRIPTION and ds.ApprovalStatus == "UNAPPROVED"
    assert ds.StudyInstanceUID == headers[0].StudyInstanceUID and ds.PatientID == headers[0].PatientID
    [frame] = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
    [series] = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == headers[0].SeriesInstanceUID
    assert [str(i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence] == [
        str(h.SOPInstanceUID) for h in headers
    ]
    [roi] = ds.StructureSetROISequence
    assert "liver" in roi.ROIName.lower() and roi.ROIGenerationAlgorithm == "AUTOMATIC"
    [observation] = ds.RTROIObservationsSequence
    assert observation.RTROIInterpretedType == "ORGAN"
    assert observation.RTROIIdentificationCodeSequence[0].CodeValue == "10200004"  # SCT Liver
    [contours] = ds.ROIContourSequence
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    on_slices = set()
    for contour in contours.ContourSequence:
        image = by_uid[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
        on_slices.add(str(image.SOPInstanceUID))
        points = np.asarray(contour.ContourData, float).reshape(-1, 3)
        assert contour.ContourGeometricType == "CLOSED_PLANAR" and len(points) == contour.NumberOfContourPoints
        normal = np.cross(np.asarray(image.ImageOrientationPatient[:3]), np.asarray(image.ImageOrientationPatient[3:]))
        offsets = (points - np.asarray(image.ImagePositionPatient, float)) @ normal
        assert np.abs(offsets).max() < 1e-3  # in the image's plane
    assert on_slices == {str(h.SOPInstanceUID) for h, m in zip(headers, mask, strict=True) if m.any()}


def test_same_inputs_give_the_same_uids_and_not_the_segs(phantom_series) -> None:
    _, headers, mask = phantom_series
    first = build_liver_rtstruct(source_images=headers, mask=mask, source_series_version=1, **ALGORITHM)
    again = build_liver_rtstruct(source_images=headers, mask=mask, source_series_version=1, **ALGORITHM)
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (first.SeriesInstanceUID, first.SOPInstanceUID)
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    parts = {
        "source_series_instance_uid": str(headers[0].SeriesInstanceUID),
        "source_series_version": 1,
        "algorithm_version": ALGORITHM["algorithm_version"],
    }
    assert rtstruct_uids(**parts) == (first.SeriesInstanceUID, first.SOPInstanceUID)
    assert set(rtstruct_uids(**parts)).isdisjoint(seg_uids(**parts))
    second_version = build_liver_rtstruct(source_images=headers, mask=mask, source_series_version=2, **ALGORITHM)
    assert second_version.SOPInstanceUID != first.SOPInstanceUID


def test_empty_mask_is_refused(phantom_series) -> None:
    _, headers, mask = phantom_series
    with pytest.raises(ValueError, match="mask is empty"):
        build_liver_rtstruct(source_images=headers, mask=np.zeros_like(mask), source_series_version=1, **ALGORITHM)


def test_mask_with_wrong_shape_is_refused(phantom_series) -> None:
    _, headers, mask = phantom_series
    with pytest.raises(ValueError, match=r"mask has shape \(15, 96, 96\); expected \(16, 96, 96\)"):
        build_liver_rtstruct(source_images=headers, mask=mask[:15], source_series_version=1, **ALGORITHM)


def test_image_without_pixel_spacing_is_refused(phantom_series) -> None:
    _, headers, mask = phantom_series
    broken = copy.deepcopy(headers[2])
    del broken.PixelSpacing
    with pytest.raises(ValueError, match=r"source_images\[2\] has no PixelSpacing"):
        build_liver_rtstruct(
            source_images=[*headers[:2], broken, *headers[3:]], mask=mask, source_series_version=1, **ALGORITHM
        )


def test_orientation_that_is_not_two_orthogonal_unit_vectors_is_refused(phantom_series) -> None:
    _, headers, mask = phantom_series
    skewed = copy.deepcopy(headers[0])
    skewed.ImageOrientationPatient = [1, 0, 0, 0.5, 0.5, 0]
    with pytest.raises(ValueError, match="expected two orthogonal unit vectors"):
        build_liver_rtstruct(source_images=[skewed, *headers[1:]], mask=mask, source_series_version=1, **ALGORITHM)


@pytest.mark.parametrize("name", ["", "   ", "L" * 65, "Liver\\Auto"])
def test_bad_roi_name_is_refused(phantom_series, name: str) -> None:
    _, headers, mask = phantom_series
    with pytest.raises(ValueError, match="roi_name"):
        build_liver_rtstruct(source_images=headers, mask=mask, source_series_version=1, roi_name=name, **ALGORITHM)


# --- settings ---------------------------------------------------------------------------------------


def test_export_format_defaults_to_seg_and_takes_rtstruct_or_both() -> None:
    assert Settings().export_format == "seg" and Settings().rtstruct_roi_name == "Liver"
    assert Settings(export_format="RTSTRUCT").export_format == "rtstruct"
    assert Settings(export_format="both", rtstruct_roi_name=" Liver AI ").rtstruct_roi_name == "Liver AI"


@pytest.mark.parametrize(("field", "value"), [("export_format", "nifti"), ("rtstruct_roi_name", "Liver\\x")])
def test_bad_export_settings_refuse_to_load(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=field):
        Settings(**{field: value})


# --- gatekeeper segment --format rtstruct -------------------------------------------------------------


def test_segment_command_writes_an_rtstruct_with_one_liver_roi(tmp_path: Path) -> None:
    from service.phantom.generate import generate_run
    from service.phantom.truth import load_manifest, load_series

    run = tmp_path / "run"
    generate_run(
        [SeriesSpec(folder="one", patient_seed=777, series_seed=1777, num_slices=20, matrix=128)], run, progress=False
    )
    out = tmp_path / "liver.rtstruct.dcm"
    assert gatekeeper(["segment", str(run / "one"), "--out", str(out), "--format", "rtstruct"]) == 0
    assert dciodvfy_errors(out) == []
    ds = pydicom.dcmread(out)
    assert ds.Modality == "RTSTRUCT"
    [roi] = ds.StructureSetROISequence
    assert "liver" in roi.ROIName.lower()
    entry = load_manifest(run)["series"][0]
    truth = load_series(run, entry)
    ct_folder = tmp_path / "ct"
    ct_folder.mkdir()
    for name in entry["files"]:  # the CT only: rt-utils reads every file with pixels as the series
        (ct_folder / name).write_bytes((run / "one" / name).read_bytes())
    by_uid = rasterise_with_rt_utils(ct_folder, out, roi.ROIName)
    got = np.stack([by_uid[uid] for uid in truth.sop_instance_uids])
    score = dice(got, truth.labels == Label.LIVER)
    print(f"segment --format rtstruct: Dice vs the phantom's liver {score:.3f}")
    assert score > 0.9  # the segmenter's own accuracy, not the contours'


def test_segment_command_with_an_unknown_format_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_:
        gatekeeper(["segment", str(tmp_path), "--out", str(tmp_path / "x.dcm"), "--format", "nifti"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'nifti'" in err[0], err
