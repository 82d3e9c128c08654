"""Steps 2 and 3, find the liver and rasterise it onto the CT grid: the one reader of liver contours.

The liver is the first name of the name map (`Settings.liver_structure_names`, compared without
letter case and surrounding blanks) among the ROI names (RTSTRUCT) or segment labels (SEG); a SEG
segment of type SCT 10200004 (Liver) also counts. rt-utils rasterises RT Structure Sets (contours
without a Contour Image Sequence are placed on the slice whose plane holds them), highdicom
Segmentations. `read_liver_mask` is the reader for the contour stage and for the segmenter's
training data (`models/segmenter/contours.py`); the mask is bool [slice, row, column] in volume order.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from service import imaging
from service.contours.common import ContourProblem, element_uid, sequence_items
from service.db.tables import ContourStatus
from service.ingest.checks import CT_IMAGE_STORAGE, RT_STRUCTURE_SET_STORAGE, SEGMENTATION_STORAGE

#: SNOMED CT code of the liver (Segmented Property Type of a SEG segment).
LIVER_SCT_CODE = "10200004"


def normalise_structure_name(name: str) -> str:
    """`name` as the name map compares it: blanks collapsed and trimmed, letter case folded."""
    return " ".join(str(name).split()).casefold()


def liver_structure(names: Sequence[str], liver_names: Sequence[str]) -> str | None:
    """The structure among `names` (ROI names, segment labels) that is the liver, as written; None if none.

    The first name of `liver_names` (the setting `liver_structure_names`) found among `names`
    wins, so the order of the setting ranks e.g. "Liver_manual" above "Liver" when both are present.
    """
    by_key: dict[str, str] = {}
    for name in names:
        by_key.setdefault(normalise_structure_name(name), str(name))
    for wanted in liver_names:
        found = by_key.get(normalise_structure_name(wanted))
        if found is not None:
            return found
    return None


def ct_headers(paths: Iterable[Path]) -> list[Dataset]:
    """The CT Image headers among `paths`, ordered head → feet (the volume order of the pipeline).

    Raises:
        ContourProblem: (unreadable) no CT image, or slices without usable geometry.
    """
    headers = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if str(getattr(ds, "SOPClassUID", "")) == CT_IMAGE_STORAGE:
            headers.append(ds)
    if not headers:
        raise ContourProblem(ContourStatus.UNREADABLE, "the matched series holds no CT image")
    try:
        order = imaging.slice_order([h.ImagePositionPatient for h in headers], headers[0].ImageOrientationPatient)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ContourProblem(
            ContourStatus.UNREADABLE, f"the matched series has no usable slice geometry: {exc}"
        ) from None
    return [headers[int(i)] for i in order]


def _slice_normal(header: Dataset) -> np.ndarray:
    return np.asarray(imaging.slice_normal([float(v) for v in header.ImageOrientationPatient]), dtype=np.float64)


def _with_contour_image_references(rtstruct: Dataset, roi_number: int, headers: Sequence[Dataset]) -> Dataset:
    """A copy of `rtstruct` whose contours of ROI `roi_number` rt-utils can place on `headers`' slices.

    Keeps the closed planar contours only (points and open polylines enclose nothing) and gives a
    contour that references none of `headers` (the Contour Image Sequence is optional; or it was
    drawn on another series of the same Frame of Reference) a reference to the slice whose plane
    holds its points, within half the slice spacing; contours off every slice are dropped.
    """
    ds = copy.deepcopy(rtstruct)
    ours = {str(h.SOPInstanceUID) for h in headers}
    normal = _slice_normal(headers[0])
    locations = np.array([float(np.dot(normal, [float(v) for v in h.ImagePositionPatient])) for h in headers])
    spacing = float(np.min(np.abs(np.diff(locations)))) if len(locations) > 1 else 1.0
    for roi_contour in sequence_items(ds, "ROIContourSequence"):
        if int(getattr(roi_contour, "ReferencedROINumber", -1)) != roi_number:
            continue
        kept = []
        for contour in sequence_items(roi_contour, "ContourSequence"):
            if str(getattr(contour, "ContourGeometricType", "CLOSED_PLANAR")).strip() != "CLOSED_PLANAR":
                continue
            referenced = {
                element_uid(i, "ReferencedSOPInstanceUID") for i in sequence_items(contour, "ContourImageSequence")
            }
            if not referenced & ours:  # no reference, or to another series in the same frame of reference
                points = np.asarray([float(v) for v in contour.ContourData], dtype=np.float64).reshape(-1, 3)
                distance = np.abs(locations - float(np.mean(points @ normal)))
                nearest = int(np.argmin(distance))
                if distance[nearest] > spacing / 2:
                    continue  # off every slice of this series
                image = Dataset()
                image.ReferencedSOPClassUID = headers[nearest].SOPClassUID
                image.ReferencedSOPInstanceUID = headers[nearest].SOPInstanceUID
                contour.ContourImageSequence = [image]
            kept.append(contour)
        roi_contour.ContourSequence = kept
    return ds


def rasterise_rtstruct(
    rtstruct: Dataset, headers: Sequence[Dataset], liver_names: Sequence[str]
) -> tuple[str, np.ndarray]:
    """The liver ROI of an RT Structure Set on the CT grid: (ROI name, bool [slice, row, column]).

    `headers` are the CT slices in volume order (`ct_headers`); the mask follows that order.
    rt-utils fills each slice's closed contours by the even-odd rule (holes stay holes).

    Raises:
        ContourProblem: no_liver (no ROI named like the liver), unreadable (malformed contours,
            slices rt-utils cannot handle).
    """
    names = [str(getattr(r, "ROIName", "")) for r in sequence_items(rtstruct, "StructureSetROISequence")]
    name = liver_structure(names, liver_names)
    if name is None:
        raise ContourProblem(
            ContourStatus.NO_LIVER,
            f"no ROI named like the liver ({', '.join(liver_names)}); it has {', '.join(names) or 'none'}",
        )
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    if rows != columns:
        raise ContourProblem(
            ContourStatus.UNREADABLE, f"the CT slices are {rows}x{columns}; rt-utils rasterises square slices only"
        )
    [roi_number] = [int(r.ROINumber) for r in rtstruct.StructureSetROISequence if str(r.ROIName) == name][:1]
    from rt_utils import RTStruct  # OpenCV-based: loaded only in the process that meets an RTSTRUCT
    from rt_utils.image_helper import get_slice_position

    prepared = _with_contour_image_references(rtstruct, roi_number, headers)
    ascending = sorted(headers, key=get_slice_position)  # the order of rt-utils' mask
    try:
        volume = RTStruct(ascending, prepared).get_roi_mask_by_name(name)  # [rows, columns, slices]
    except Exception as exc:  # rt-utils and OpenCV raise plain Exception / cv2.error for bad contours
        raise ContourProblem(
            ContourStatus.UNREADABLE, f"cannot rasterise ROI {name!r}: {type(exc).__name__}: {exc}"
        ) from None
    by_uid = {str(h.SOPInstanceUID): volume[:, :, i] for i, h in enumerate(ascending)}
    return name, np.stack([by_uid[str(h.SOPInstanceUID)] for h in headers]).astype(bool)


def rasterise_seg(
    seg_dataset: Dataset, headers: Sequence[Dataset], liver_names: Sequence[str]
) -> tuple[str, np.ndarray]:
    """The liver segment of a Segmentation on the CT grid: (segment label, bool [slice, row, column]).

    The segment is found by label through the name map, else by Segmented Property Type SCT
    10200004 (Liver). Frames are placed by their source CT instances (highdicom); CT slices the
    SEG does not reference are empty. A FRACTIONAL segment counts where it is above one half.

    Raises:
        ContourProblem: no_liver, or unreadable (not a Segmentation highdicom reads, no source
            instance of this series).
    """
    import highdicom as hd

    try:
        seg = hd.seg.Segmentation.from_dataset(seg_dataset, copy=False)
    except Exception as exc:  # highdicom raises ValueError, AttributeError, KeyError … for malformed objects
        raise ContourProblem(
            ContourStatus.UNREADABLE, f"not a readable Segmentation: {type(exc).__name__}: {exc}"
        ) from None
    segments = [
        (
            int(d.SegmentNumber),
            str(getattr(d, "SegmentLabel", "")),
            {str(c.CodeValue) for c in sequence_items(d, "SegmentedPropertyTypeCodeSequence")},
        )
        for d in sequence_items(seg, "SegmentSequence")
    ]
    name = liver_structure([label for _, label, _ in segments], liver_names)
    if name is None:
        coded = [(number, label) for number, label, codes in segments if LIVER_SCT_CODE in codes]
        if not coded:
            labels = ", ".join(label for _, label, _ in segments) or "none"
            raise ContourProblem(
                ContourStatus.NO_LIVER,
                f"no segment labelled like the liver ({', '.join(liver_names)}) or of type SCT {LIVER_SCT_CODE}; "
                f"it has {labels}",
            )
        number, name = coded[0]
    else:
        number = next(n for n, label, _ in segments if label == name)
    uids = [str(h.SOPInstanceUID) for h in headers]
    try:
        referenced = {str(sop) for _, _, sop in seg.get_source_image_uids()}
        present = [uid for uid in uids if uid in referenced]
        if not present:
            raise ContourProblem(ContourStatus.UNREADABLE, "it references none of the matched series' CT instances")
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=present, segment_numbers=[number], assert_missing_frames_are_empty=True
        )[..., 0]
    except ContourProblem:
        raise
    except Exception as exc:  # highdicom: frames it cannot place on the source instances
        raise ContourProblem(
            ContourStatus.UNREADABLE, f"cannot read segment {name!r}: {type(exc).__name__}: {exc}"
        ) from None
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    if pixels.shape[1:] != (rows, columns):
        raise ContourProblem(
            ContourStatus.UNREADABLE, f"segment frames are {pixels.shape[1]}x{pixels.shape[2]}, CT is {rows}x{columns}"
        )
    mask = np.zeros((len(uids), rows, columns), bool)
    where = {uid: i for i, uid in enumerate(present)}
    for n, uid in enumerate(uids):
        if uid in where:
            mask[n] = pixels[where[uid]] > 0.5
    return name, mask


def read_liver_mask(ds: Dataset, headers: Sequence[Dataset], liver_names: Sequence[str]) -> tuple[str, np.ndarray]:
    """The liver of contour object `ds` (RT Structure Set or Segmentation) on `headers`' grid.

    Returns (structure name as written, bool [slice, row, column] in the order of `headers`); the
    mask may be empty. `headers` are the CT slices of the series `ds` refers to (`ct_headers`);
    `liver_names` is the name map (`liver_structure`).

    Raises:
        ContourProblem: no_liver (no structure named like the liver) or unreadable (not a contour
            object, malformed contours or segments, slices the libraries cannot handle).
    """
    sop_class = str(getattr(ds, "SOPClassUID", ""))
    if sop_class == RT_STRUCTURE_SET_STORAGE:
        return rasterise_rtstruct(ds, headers, liver_names)
    if sop_class == SEGMENTATION_STORAGE:
        return rasterise_seg(ds, headers, liver_names)
    raise ContourProblem(ContourStatus.UNREADABLE, f"SOP Class {sop_class or '(none)'} is not a contour object")


def rasterise(ds: Dataset, headers: Sequence[Dataset], liver_names: Sequence[str]) -> tuple[str, np.ndarray]:
    """The liver of contour object `ds` on `headers`' grid for the pool (`read_liver_mask`), never empty.

    Raises:
        ContourProblem: no_liver, empty (no liver voxel on these slices) or unreadable.
    """
    name, mask = read_liver_mask(ds, headers, liver_names)
    if not mask.any():
        raise ContourProblem(ContourStatus.EMPTY, f"structure {name!r} has no liver voxel on the series' CT slices")
    return name, mask
