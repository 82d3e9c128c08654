"""Liver contours from the formats a clinic has: DICOM-SEG (highdicom) or RT Structure Set (rt-utils).

A contour object is matched to its CT series by the referenced SeriesInstanceUID (SEG:
ReferencedSeriesSequence; RTSTRUCT: ReferencedFrameOfReferenceSequence → RT Referenced Study →
RT Referenced Series), never by folder or file name. The liver is the SEG segment whose
property type is SCT 10200004 (Liver) or whose label is "liver" in any letter case, and the
RTSTRUCT ROI named "liver" in any letter case ("Liver", "LIVER"). Masks are rasterised by the
libraries (highdicom, rt-utils), not by code here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import RTStructureSetStorage, SegmentationStorage

from service import dicom_series

log = logging.getLogger(__name__)

LIVER_SCT_CODE = "10200004"


class ContourError(ValueError):
    """A contour object cannot be used; the message names the file and the problem."""


class NoLiver(ContourError):
    """The contour object is fine but holds no liver (e.g. an anomaly SEG): skipped quietly."""


@dataclass(frozen=True)
class LiverContour:
    """The liver mask of one CT series, slice by slice.

    Attributes:
        series_instance_uid: the CT series the contour refers to.
        path: the SEG or RTSTRUCT file it came from.
        masks: bool [rows, columns] mask per referenced CT SOPInstanceUID; CT slices that are not
            listed have no liver.
    """

    series_instance_uid: str
    path: Path
    masks: dict[str, np.ndarray]

    def volume_for(self, series: dicom_series.CTSeries) -> np.ndarray:
        """The mask as bool [slice, row, column] in `series`' slice order.

        Raises:
            ContourError: the contour is for another series or its masks have another size.
        """
        if series.series_instance_uid != self.series_instance_uid:
            raise ContourError(
                f"{self.path.name}: refers to series {self.series_instance_uid}, not {series.series_instance_uid}"
            )
        out = np.zeros(series.hu.shape, bool)
        for n, uid in enumerate(series.sop_instance_uids):
            m = self.masks.get(uid)
            if m is None:
                continue
            if m.shape != out.shape[1:]:
                raise ContourError(f"{self.path.name}: mask for {uid} is {m.shape}, slice is {out.shape[1:]}")
            out[n] = m
        return out


def _is_liver_name(name: str) -> bool:
    return name.strip().lower() == "liver"


def read_seg_liver(path: Path) -> LiverContour:
    """The liver segment of a DICOM-SEG.

    Raises:
        ContourError: no liver segment, or no referenced series.
    """
    seg = hd.seg.segread(path)
    numbers = [
        d.SegmentNumber
        for d in seg.SegmentSequence
        if any(str(c.CodeValue) == LIVER_SCT_CODE for c in d.SegmentedPropertyTypeCodeSequence)
        or _is_liver_name(str(d.SegmentLabel))
    ]
    if not numbers:
        labels = ", ".join(str(d.SegmentLabel) for d in seg.SegmentSequence)
        raise NoLiver(f"{path.name}: no liver segment (SCT {LIVER_SCT_CODE} or label 'Liver'); has {labels}")
    refs = getattr(seg, "ReferencedSeriesSequence", None)
    if not refs:
        raise ContourError(f"{path.name}: SEG has no ReferencedSeriesSequence")
    series_uid = str(refs[0].SeriesInstanceUID)
    sop_uids = [str(r.ReferencedSOPInstanceUID) for r in refs[0].ReferencedInstanceSequence]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sop_uids, segment_numbers=[int(numbers[0])], assert_missing_frames_are_empty=True
    )[..., 0]
    return LiverContour(series_uid, Path(path), {u: pixels[i].astype(bool) for i, u in enumerate(sop_uids)})


def read_rtstruct_liver(path: Path, series_files: dicom_series.SeriesFiles) -> LiverContour:
    """The liver ROI of an RT Structure Set, rasterised on `series_files`' slices by rt-utils.

    Raises:
        ContourError: no ROI named liver, or rt-utils cannot map the contours onto the series.
    """
    from rt_utils import RTStruct  # opencv-based; imported only when an RTSTRUCT is met
    from rt_utils.image_helper import get_slice_position

    ds = pydicom.dcmread(path)
    names = [str(r.ROIName) for r in getattr(ds, "StructureSetROISequence", [])]
    liver = [n for n in names if _is_liver_name(n)]
    if not liver:
        raise NoLiver(f"{path.name}: no ROI named 'Liver'; has {', '.join(names) or 'none'}")
    images = [pydicom.dcmread(i.path) for i in series_files.instances]
    images.sort(key=get_slice_position)  # the order rt-utils' masks follow
    try:
        volume = RTStruct(images, ds).get_roi_mask_by_name(liver[0])  # [rows, columns, slices]
    except Exception as exc:  # noqa: BLE001 — rt-utils raises plain Exception for bad geometry
        raise ContourError(f"{path.name}: cannot rasterise ROI {liver[0]!r}: {exc}") from None
    return LiverContour(
        series_files.series_instance_uid,
        Path(path),
        {str(img.SOPInstanceUID): volume[:, :, i].astype(bool) for i, img in enumerate(images)},
    )


def rtstruct_series_uid(ds: pydicom.Dataset) -> str | None:
    """The CT SeriesInstanceUID an RT Structure Set refers to, or None."""
    try:
        study = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
        return str(study.RTReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError):
        return None


def find_liver_contours(groups: list[dicom_series.SeriesFiles]) -> dict[str, LiverContour]:
    """Liver contours among scanned series (`dicom_series.scan_tree`), keyed by the CT series they refer to.

    Contour files that cannot be used are skipped with a warning naming the file; SEGs and
    structure sets without a liver are skipped quietly. When several contours refer to one
    series, the first by path wins (a warning says so).
    """
    ct_by_uid = {g.series_instance_uid: g for g in groups if g.is_ct}
    found: dict[str, LiverContour] = {}
    objects = sorted(
        (i for g in groups for i in g.instances if i.sop_class_uid in (SegmentationStorage, RTStructureSetStorage)),
        key=lambda i: str(i.path),
    )
    for inst in objects:
        try:
            if inst.sop_class_uid == SegmentationStorage:
                contour = read_seg_liver(inst.path)
            else:
                ds = pydicom.dcmread(inst.path, stop_before_pixels=True)
                uid = rtstruct_series_uid(ds)
                if uid is None or uid not in ct_by_uid:
                    raise ContourError(f"{inst.path.name}: refers to no CT series that was found")
                contour = read_rtstruct_liver(inst.path, ct_by_uid[uid])
        except NoLiver as exc:
            log.debug("no liver: %s", exc)
            continue
        except ContourError as exc:
            log.warning("skipping contour: %s", exc)
            continue
        if contour.series_instance_uid in found:
            log.warning(
                "series has a second liver contour %s; using %s",
                inst.path.name,
                found[contour.series_instance_uid].path.name,
            )
            continue
        found[contour.series_instance_uid] = contour
    return found
