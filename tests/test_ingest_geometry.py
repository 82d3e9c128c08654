"""Series geometry checks: one test per failure mode, plus the consistent series and Enhanced CT frames."""

from __future__ import annotations

from pydicom.dataset import Dataset

from service.ingest.geometry import SlicePlane, check_geometry, planes_from_dataset

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def axial_series(z_positions: list[float], orientation: tuple[float, ...] = AXIAL) -> list[SlicePlane]:
    return [SlicePlane(f"1.2.3.{i}", (-100.0, -120.0, z), orientation) for i, z in enumerate(z_positions)]  # type: ignore[arg-type]


def codes(planes: list[SlicePlane]) -> list[str]:
    return [finding.code for finding in check_geometry(planes)]


def test_consistent_series_has_no_findings_in_any_order() -> None:
    z = [2.5 * i for i in range(40)]
    assert codes(axial_series(z[::-1])) == []
    assert codes(axial_series(z[::2] + z[1::2])) == []


def test_series_with_two_orientations_is_flagged() -> None:
    planes = axial_series([0.0, 2.0, 4.0, 6.0])
    planes[2] = SlicePlane("x", (-100.0, -120.0, 4.0), (1.0, 0.0, 0.0, 0.0, 0.9, 0.43589))
    [finding] = check_geometry(planes)
    assert finding.code == "multiple_orientations"
    assert finding.message == "Series has 2 orientations; expected 1 (ImageOrientationPatient differs at slice 3)."


def test_series_with_duplicate_positions_is_flagged() -> None:
    assert codes(axial_series([0.0, 2.0, 2.0, 4.0, 6.0])) == ["duplicate_positions"]


def test_series_with_missing_slices_is_flagged() -> None:
    [finding] = check_geometry(axial_series([0.0, 2.0, 4.0, 10.0, 12.0]))
    assert finding.code == "missing_slices" and "about 2 slice(s) missing" in finding.message


def test_series_with_inconsistent_spacing_is_flagged() -> None:
    assert codes(axial_series([0.0, 2.0, 4.0, 5.3, 7.3, 9.3])) == ["inconsistent_spacing"]


def test_localizer_is_flagged() -> None:
    planes = [SlicePlane("1.2", (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 0.0, -1.0), is_localizer=True)]
    assert codes(planes) == ["localizer", "too_few_slices"]


def test_slices_without_position_are_flagged_not_fatal() -> None:
    planes = axial_series([0.0, 2.0, 4.0, 6.0]) + [SlicePlane("1.9", None, AXIAL)]  # type: ignore[arg-type]
    assert codes(planes) == ["missing_geometry"]


def test_empty_series_is_flagged() -> None:
    assert codes([]) == ["no_slices"]


def test_tilted_but_consistent_series_has_no_findings() -> None:
    # Gantry tilt of 20 degrees: positions move along the slice normal, not along z.
    import math

    row, column = (1.0, 0.0, 0.0), (0.0, math.cos(0.349), -math.sin(0.349))
    normal = (0.0, math.sin(0.349), math.cos(0.349))
    planes = [SlicePlane(str(i), tuple(3.0 * i * n for n in normal), (*row, *column)) for i in range(10)]  # type: ignore[arg-type]
    assert codes(planes) == []


def test_enhanced_ct_frames_are_read_from_functional_groups() -> None:
    dataset = Dataset()
    dataset.SOPInstanceUID = "1.2.3"
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(AXIAL)
    shared.PlaneOrientationSequence = [orientation]
    dataset.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for z in (0.0, 3.0, 6.0, 12.0):
        frame, position = Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, z]
        frame.PlanePositionSequence = [position]
        frames.append(frame)
    dataset.PerFrameFunctionalGroupsSequence = frames
    planes = planes_from_dataset(dataset)
    assert [p.position for p in planes] == [(0.0, 0.0, z) for z in (0.0, 3.0, 6.0, 12.0)]
    assert codes(planes) == ["missing_slices"]
