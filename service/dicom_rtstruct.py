"""The RT Structure Set we deliver: the segmenter's liver mask as one ROI of closed planar contours (pydicom).

For treatment planning systems that read contours rather than DICOM-SEG. One object per (source
series version, algorithm version), like the SEG (`service.dicom_seg`): its SeriesInstanceUID and
SOP Instance UID are derived from the source SeriesInstanceUID, the series version and the
algorithm version, so making it again and sending it again replaces the same object in the PACS.
It references every source CT instance (RT Referenced Series → Contour Image Sequence), shares
their Frame of Reference, is marked UNAPPROVED and says in its SeriesDescription that nobody has
reviewed it.

The contours come from the 2-D mask of each slice (`mask_contours`, marching squares): every
connected region is one closed contour and every hole in it another, so a reader that combines
the contours of a slice by the even-odd rule — as DICOM readers commonly do (rt-utils, OpenCV's
fillPoly) — gets the holes back. Contour points are in the patient coordinate system (mm), from
each slice's ImagePositionPatient, ImageOrientationPatient and PixelSpacing.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, RTStructureSetStorage

from service.dicom_headers import sanitised_headers
from service.uids import derived_uid

log = logging.getLogger(__name__)

# Namespace of the structure set's deterministic UIDs (see `service.uids.derived_uid`).
UID_NAMESPACE = "ct-gatekeeper-rtstruct"
# SeriesDescription (LO) of every structure set we make: automatic and not reviewed.
SERIES_DESCRIPTION = "AUTO LIVER RTSTRUCT - UNREVIEWED"
# StructureSetLabel (SH, at most 16 characters) and StructureSetDescription (ST).
STRUCTURE_SET_LABEL = "AUTO_LIVER"
STRUCTURE_SET_DESCRIPTION = "Automatic liver segmentation, not reviewed by a person"
# SeriesNumber of the structure set's series; after the SEG's (9901) so viewers list it last.
SERIES_NUMBER = 9902
MANUFACTURER = "CT Gatekeeper"
DEVICE_SERIAL_NUMBER = "1"
LIVER_ROI_NUMBER = 1
DEFAULT_ROI_NAME = "Liver"
# ROIDisplayColor (RGB), the colour a planning system draws the liver in.
LIVER_DISPLAY_COLOR = (221, 130, 101)
# Longest value of a LO (Long String) element, e.g. ROIName and AlgorithmVersion (PS3.5 6.2).
MAX_LO_LENGTH = 64
# Where a contour crosses the line between a pixel centre inside the mask and one outside, as the
# fraction of the way from the inside centre. Marching squares at level 0.5 puts it halfway (0.5),
# exactly where a reader that rounds points to the nearest pixel is at a tie; at 0.4 both common
# readers — "pixel centre inside the polygon" and "round the points, fill the polygon with its edge"
# (rt-utils, OpenCV) — give back the mask, and the ROI's area is at most 0.1 pixel per boundary
# pixel smaller than the mask's.
CROSSING_FROM_INSIDE = 0.4
# Largest departure from unit length or orthogonality of ImageOrientationPatient we accept.
ORIENTATION_TOLERANCE = 1e-3


def rtstruct_uids(
    *, source_series_instance_uid: str, source_series_version: int, algorithm_version: str
) -> tuple[str, str]:
    """The (SeriesInstanceUID, SOPInstanceUID) of the structure set of one source series version by one algorithm.

    The same inputs always give the same pair; a new series version or a new algorithm version
    gives a new pair. Different from the SEG's pair for the same inputs.
    """
    parts = (source_series_instance_uid, source_series_version, algorithm_version)
    return (
        derived_uid(UID_NAMESPACE, "rtstruct-series", *parts),
        derived_uid(UID_NAMESPACE, "rtstruct-instance", *parts),
    )


# --- contours of a 2-D mask -------------------------------------------------------------------------

# Marching squares. A cell's corners are the pixel centres (i, j) "tl", (i, j+1) "tr", (i+1, j+1)
# "br" and (i+1, j) "bl"; its case is tl·8 + tr·4 + br·2 + bl·1 (1 = inside the mask). Each case
# joins crossings on the cell's edges T(op), R(ight), B(ottom), L(eft). In the two saddle cases
# (5, 10) the inside corners are kept apart: regions touching only at a corner are separate
# (4-connectivity, as scipy.ndimage.label by default), each with its own contour.
_CASE_SEGMENTS: dict[int, tuple[tuple[str, str], ...]] = {
    1: (("B", "L"),),
    2: (("R", "B"),),
    3: (("L", "R"),),
    4: (("T", "R"),),
    5: (("T", "R"), ("B", "L")),
    6: (("T", "B"),),
    7: (("T", "L"),),
    8: (("T", "L"),),
    9: (("T", "B"),),
    10: (("T", "L"), ("R", "B")),
    11: (("T", "R"),),
    12: (("L", "R"),),
    13: (("R", "B"),),
    14: (("B", "L"),),
}

# An edge of the pixel-centre grid: ("h", i, j) joins (i, j)–(i, j+1); ("v", i, j) joins (i, j)–(i+1, j).
_Edge = tuple[str, int, int]


def _cell_edge(side: str, i: int, j: int) -> _Edge:
    return {"T": ("h", i, j), "B": ("h", i + 1, j), "L": ("v", i, j), "R": ("v", i, j + 1)}[side]


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """The closed contours of a 2-D binary mask, as float arrays of (row, column) pixel coordinates.

    One contour per connected region (4-connectivity) and one per hole in a region; combined by
    the even-odd rule they give back the mask: a pixel is in the mask exactly when its centre lies
    inside an odd number of contours. Each contour is a closed polygon (the last point is not
    repeated), without collinear points; regions touching the image border are closed along it.
    The order of the contours and the direction of each are unspecified.

    Raises:
        ValueError: `mask` is not a 2-D bool array.
    """
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.ndim != 2:
        found = f"{mask.dtype} {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"mask is {found}; expected a 2-D bool array")
    padded = np.pad(mask, 1).astype(np.uint8)  # an outside border closes regions at the image's edge
    case = padded[:-1, :-1] * 8 + padded[:-1, 1:] * 4 + padded[1:, 1:] * 2 + padded[1:, :-1]
    neighbours: dict[_Edge, list[_Edge]] = {}
    for i, j in np.argwhere((case > 0) & (case < 15)).tolist():
        for a, b in _CASE_SEGMENTS[int(case[i, j])]:
            ea, eb = _cell_edge(a, i, j), _cell_edge(b, i, j)
            neighbours.setdefault(ea, []).append(eb)
            neighbours.setdefault(eb, []).append(ea)
    # Every crossing lies on an edge shared by two cells and is in one segment of each: the
    # segments form disjoint cycles. Walk each one.
    contours = []
    unvisited = set(neighbours)
    while unvisited:
        start = min(unvisited)  # deterministic order
        loop = [start]
        unvisited.discard(start)
        previous, current = start, neighbours[start][0]
        while current != start:
            loop.append(current)
            unvisited.discard(current)
            one, other = neighbours[current]
            previous, current = current, (other if one == previous else one)
        points = np.array([_crossing(edge, padded) for edge in loop], dtype=np.float64) - 1.0  # unpad
        contours.append(_without_collinear_points(points))
    return contours


def _crossing(edge: _Edge, padded: np.ndarray) -> tuple[float, float]:
    """The (row, column) where the contour crosses `edge`, CROSSING_FROM_INSIDE from its inside end."""
    kind, i, j = edge
    other = (i, j + 1) if kind == "h" else (i + 1, j)
    inside, outside = ((i, j), other) if padded[i, j] else (other, (i, j))
    return (
        inside[0] + CROSSING_FROM_INSIDE * (outside[0] - inside[0]),
        inside[1] + CROSSING_FROM_INSIDE * (outside[1] - inside[1]),
    )


def _without_collinear_points(points: np.ndarray) -> np.ndarray:
    """`points` (a closed polygon) without the points that lie on the line through their neighbours."""
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    cross = (points[:, 0] - before[:, 0]) * (after[:, 1] - points[:, 1]) - (points[:, 1] - before[:, 1]) * (
        after[:, 0] - points[:, 0]
    )
    keep = np.abs(cross) > 1e-9
    return points[keep] if keep.sum() >= 3 else points


# --- the structure set ------------------------------------------------------------------------------


def build_liver_rtstruct(
    *,
    source_images: Sequence[pydicom.Dataset],
    mask: np.ndarray,
    algorithm_name: str,
    algorithm_version: str,
    source_series_version: int,
    roi_name: str = DEFAULT_ROI_NAME,
    series_number: int = SERIES_NUMBER,
    manufacturer: str = MANUFACTURER,
    software_versions: str | None = None,
    device_serial_number: str = DEVICE_SERIAL_NUMBER,
) -> pydicom.FileDataset:
    """The automatic liver segmentation of one CT series version, as an RT Structure Set with one ROI.

    Args:
        source_images: the CT instances of one series; headers are enough (pixel data may be absent).
        mask: bool [slice, row, column]; `mask[i]` is the liver on `source_images[i]`, whatever the
            order of the images in space.
        algorithm_name: the segmenter's name, e.g. "CT Gatekeeper liver U-Net" (ManufacturerModelName,
            ROIGenerationDescription).
        algorithm_version: the model's version hash (SoftwareVersions); part of the UIDs.
        source_series_version: which reception of the series this is (`Series.version`, from 1);
            part of the UIDs, so a series sent again with new content gets a new structure set.
        roi_name: ROIName of the liver ROI (`Settings.rtstruct_roi_name`).
        series_number: SeriesNumber of the structure set's series.
        manufacturer: Manufacturer (the equipment that made it: us).
        software_versions: SoftwareVersions; None: `algorithm_version`.
        device_serial_number: DeviceSerialNumber.

    Returns:
        A DICOM file dataset (RT Structure Set Storage, explicit VR little endian): one ROI
        `roi_name` (ROI number 1, interpreted type ORGAN, generation algorithm AUTOMATIC, coded
        SCT 10200004 Liver) with a CLOSED_PLANAR contour per region and per hole on every slice
        with liver, each referencing its CT image; approval status UNAPPROVED. Slices without
        liver have no contour; the RT Referenced Series still names every source instance.

    What it copies from the sources (patient, study, character set) is taken from sanitised copies
    of their headers (`service.dicom_headers`), so a real CT's header deviations do not make an
    invalid structure set.

    Raises:
        ValueError: no source images; they belong to more than one series, study or Frame of
            Reference, lack the geometry of a slice (ImagePositionPatient, ImageOrientationPatient,
            PixelSpacing) or have an ImageOrientationPatient that is not two orthogonal unit
            vectors; `mask` does not match them in dtype or shape, or is empty; a name or version
            is empty or too long; `source_series_version` < 1. The message names the field.
    """
    source_images = sanitised_headers(source_images)
    _check_inputs(
        source_images=source_images,
        mask=mask,
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
        roi_name=roi_name,
        source_series_version=source_series_version,
    )
    first = source_images[0]
    series_instance_uid, sop_instance_uid = rtstruct_uids(
        source_series_instance_uid=str(first.SeriesInstanceUID),
        source_series_version=source_series_version,
        algorithm_version=algorithm_version,
    )
    now = dt.datetime.now(dt.UTC).astimezone()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    ds = _empty_file_dataset(sop_instance_uid)
    _add_sop_common_patient_and_study(ds, first, sop_instance_uid=sop_instance_uid, date=date, time=time)
    _add_series_frame_of_reference_and_equipment(
        ds,
        first,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        date=date,
        time=time,
        manufacturer=manufacturer,
        algorithm_name=algorithm_name,
        device_serial_number=device_serial_number,
        software_versions=software_versions or algorithm_version,
    )
    _add_structure_set(
        ds,
        source_images,
        roi_name=roi_name,
        roi_generation_description=f"{algorithm_name} {algorithm_version}"[:MAX_LO_LENGTH],
        date=date,
        time=time,
    )
    contours = _liver_contours(source_images, mask)
    ds.ROIContourSequence = [_liver_roi_contour(contours)]
    ds.RTROIObservationsSequence = [_liver_roi_observation()]
    # Approval: nobody has reviewed it
    ds.ApprovalStatus = "UNAPPROVED"

    log.info(
        "built liver RTSTRUCT %s: %d contours on %d of %d slices",
        sop_instance_uid,
        len(contours),
        int(mask.any(axis=(1, 2)).sum()),
        len(source_images),
    )
    return ds


def _empty_file_dataset(sop_instance_uid: str) -> pydicom.FileDataset:
    """An empty RT Structure Set file dataset: file meta (explicit VR little endian) and preamble only."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return pydicom.FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)


def _add_sop_common_patient_and_study(
    ds: Dataset, first: pydicom.Dataset, *, sop_instance_uid: str, date: str, time: str
) -> None:
    """SOP Common (character set of the source), Patient and General Study modules: the source's values.

    Type 2 elements are empty where the source has none; optional ones are left out.
    """
    if "SpecificCharacterSet" in first:
        ds.SpecificCharacterSet = first.SpecificCharacterSet
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
    ):
        setattr(ds, keyword, first.get(keyword, ""))
    for keyword in ("StudyDescription", "IssuerOfPatientID", "PatientAge"):
        if first.get(keyword):
            setattr(ds, keyword, first.get(keyword))


def _add_series_frame_of_reference_and_equipment(
    ds: Dataset,
    first: pydicom.Dataset,
    *,
    series_instance_uid: str,
    series_number: int,
    date: str,
    time: str,
    manufacturer: str,
    algorithm_name: str,
    device_serial_number: str,
    software_versions: str,
) -> None:
    """RT Series (ours), Frame of Reference (the CT's) and General Equipment (us) modules."""
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = algorithm_name
    ds.DeviceSerialNumber = device_serial_number
    ds.SoftwareVersions = software_versions


def _add_structure_set(
    ds: Dataset,
    source_images: Sequence[pydicom.Dataset],
    *,
    roi_name: str,
    roi_generation_description: str,
    date: str,
    time: str,
) -> None:
    """Structure Set module: the references to every source image and the one liver ROI."""
    first = source_images[0]
    ds.InstanceNumber = 1
    ds.StructureSetLabel = STRUCTURE_SET_LABEL
    ds.StructureSetName = roi_name
    ds.StructureSetDescription = STRUCTURE_SET_DESCRIPTION
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame_of_reference(source_images)]
    roi = Dataset()
    roi.ROINumber = LIVER_ROI_NUMBER
    roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
    roi.ROIName = roi_name
    roi.ROIDescription = STRUCTURE_SET_DESCRIPTION
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = roi_generation_description
    ds.StructureSetROISequence = [roi]


def _liver_contours(source_images: Sequence[pydicom.Dataset], mask: np.ndarray) -> list[Dataset]:
    """The CLOSED_PLANAR contour items of every slice with liver, numbered from 1 in slice order."""
    contours: list[Dataset] = []
    for index, image in enumerate(source_images):
        if not mask[index].any():
            continue
        for points in mask_contours(mask[index]):
            contours.append(_contour_item(image, points, number=len(contours) + 1))
    return contours


def _liver_roi_contour(contours: list[Dataset]) -> Dataset:
    """The ROI Contour Sequence item of the liver ROI: its display colour and `contours`."""
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = LIVER_ROI_NUMBER
    roi_contour.ROIDisplayColor = list(LIVER_DISPLAY_COLOR)
    roi_contour.ContourSequence = contours
    return roi_contour


def _liver_roi_observation() -> Dataset:
    """The RT ROI Observations Sequence item of the liver ROI: ORGAN, coded SCT 10200004 Liver."""
    observation = Dataset()
    observation.ObservationNumber = 1
    observation.ReferencedROINumber = LIVER_ROI_NUMBER
    observation.RTROIInterpretedType = "ORGAN"
    observation.ROIInterpreter = ""
    liver = codes.SCT.Liver
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = liver.value, liver.scheme_designator, liver.meaning
    observation.RTROIIdentificationCodeSequence = [code]
    return observation


def _referenced_frame_of_reference(source_images: Sequence[pydicom.Dataset]) -> Dataset:
    """Frame of Reference → RT Referenced Study → RT Referenced Series → every CT image (Contour Image Sequence)."""
    first = source_images[0]
    images = []
    for image in source_images:
        item = Dataset()
        item.ReferencedSOPClassUID = image.SOPClassUID
        item.ReferencedSOPInstanceUID = image.SOPInstanceUID
        images.append(item)
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = images
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management, as PS3.3 C.8.8.5 asks
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [study]
    return frame


def _contour_item(image: pydicom.Dataset, points: np.ndarray, *, number: int) -> Dataset:
    """One CLOSED_PLANAR contour on `image` from (row, column) pixel coordinates, in patient coordinates (mm)."""
    position = np.asarray(image.ImagePositionPatient, dtype=np.float64)
    orientation = np.asarray(image.ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in image.PixelSpacing)
    # Column index runs along the row direction cosine, row index along the column direction cosine.
    patient = (
        position
        + points[:, 1:2] * column_spacing * orientation[None, :3]
        + points[:, 0:1] * row_spacing * orientation[None, 3:]
    )
    reference = Dataset()
    reference.ReferencedSOPClassUID = image.SOPClassUID
    reference.ReferencedSOPInstanceUID = image.SOPInstanceUID
    item = Dataset()
    item.ContourImageSequence = [reference]
    item.ContourGeometricType = "CLOSED_PLANAR"
    item.NumberOfContourPoints = len(points)
    item.ContourNumber = number
    # DS values have at most 16 characters; a micrometre is far finer than any CT pixel.
    item.ContourData = [f"{value:.3f}".rstrip("0").rstrip(".") for value in patient.ravel()]
    return item


def _check_inputs(
    *,
    source_images: Sequence[pydicom.Dataset],
    mask: np.ndarray,
    algorithm_name: str,
    algorithm_version: str,
    roi_name: str,
    source_series_version: int,
) -> None:
    """Raise ValueError naming the first input that `build_liver_rtstruct` cannot use."""
    if len(source_images) == 0:
        raise ValueError("source_images is empty; expected the CT instances of one series")
    for keyword in (
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "FrameOfReferenceUID",
        "Rows",
        "Columns",
        "SOPClassUID",
        "SOPInstanceUID",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
    ):
        for index, ds in enumerate(source_images):
            if not str(ds.get(keyword, "")):
                raise ValueError(f"source_images[{index}] has no {keyword}")
        if keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "Rows", "Columns"):
            values = {str(ds.get(keyword)) for ds in source_images}
            if len(values) > 1:
                raise ValueError(f"source_images have {len(values)} different {keyword} values; expected 1")
    for index, ds in enumerate(source_images):
        _check_geometry(ds, index)
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        found = mask.dtype if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"mask has dtype {found}; expected bool")
    expected = (len(source_images), int(source_images[0].Rows), int(source_images[0].Columns))
    if mask.shape != expected:
        raise ValueError(f"mask has shape {mask.shape}; expected {expected} (slices, Rows, Columns of source_images)")
    if not mask.any():
        raise ValueError("mask is empty; expected liver on at least one slice (an ROI needs a contour)")
    for field, value in (
        ("algorithm_name", algorithm_name),
        ("algorithm_version", algorithm_version),
        ("roi_name", roi_name),
    ):
        check_lo(field, value)
    if source_series_version < 1:
        raise ValueError(f"source_series_version is {source_series_version}; expected >= 1")


def check_lo(field: str, value: str) -> str:
    """Return `value` if it is a usable LO (Long String) value: 1 to 64 printable characters, no backslash.

    Raises:
        ValueError: it is empty or blank, too long, or has a backslash or a control character.
    """
    if (
        not value.strip()
        or len(value) > MAX_LO_LENGTH
        or "\\" in value
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in value)
    ):
        raise ValueError(
            f"{field} {value!r} must have 1 to {MAX_LO_LENGTH} characters, not all spaces, "
            "and no backslash or control character"
        )
    return value


def _check_geometry(ds: pydicom.Dataset, index: int) -> None:
    """ImagePositionPatient: 3 numbers; ImageOrientationPatient: two orthogonal unit vectors; PixelSpacing: 2 > 0."""
    position, orientation, spacing = ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
    if len(position) != 3:
        raise ValueError(f"source_images[{index}] has {len(position)} ImagePositionPatient values; expected 3")
    if len(orientation) != 6:
        raise ValueError(f"source_images[{index}] has {len(orientation)} ImageOrientationPatient values; expected 6")
    if len(spacing) != 2 or min(float(v) for v in spacing) <= 0:
        raise ValueError(f"source_images[{index}] has PixelSpacing {list(spacing)}; expected 2 values > 0")
    row, column = np.asarray(orientation[:3], np.float64), np.asarray(orientation[3:], np.float64)
    if (
        abs(np.linalg.norm(row) - 1) > ORIENTATION_TOLERANCE
        or abs(np.linalg.norm(column) - 1) > ORIENTATION_TOLERANCE
        or abs(float(row @ column)) > ORIENTATION_TOLERANCE
    ):
        raise ValueError(
            f"source_images[{index}] has ImageOrientationPatient {list(orientation)}; expected two orthogonal "
            "unit vectors"
        )
