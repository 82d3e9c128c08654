"""Liver contours from the formats a clinic has: DICOM-SEG (highdicom) or RT Structure Set (rt-utils).

A contour object is matched to its CT series by the referenced SeriesInstanceUID (SEG:
ReferencedSeriesSequence; RTSTRUCT: ReferencedFrameOfReferenceSequence → RT Referenced Study →
RT Referenced Series), never by folder or file name. The liver is the SEG segment labelled
"liver" in any letter case, else the one whose property type is SCT 10200004 (Liver), and the
RTSTRUCT ROI named "liver" in any letter case ("Liver", "LIVER"). The masks are read by the same
code as returned contours in production (`service.contours.read_liver_mask`: highdicom, rt-utils).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import RTStructureSetStorage, SegmentationStorage

from service import dicom_series
from service.contours import ContourProblem, contour_references, ct_headers, read_liver_mask
from service.db.tables import ContourStatus

log = logging.getLogger(__name__)

#: The name map of training data: the ROI or segment named "Liver" in any letter case (a SEG segment
#: of type SCT 10200004 Liver counts too, see `service.contours.liver_structure`).
LIVER_NAMES = ("Liver",)


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


def read_liver_contour(
    path: Path, series_files: dicom_series.SeriesFiles, headers: Sequence[pydicom.Dataset] | None = None
) -> LiverContour:
    """The liver of the SEG or RT Structure Set at `path` on `series_files`' CT slices.

    Read by the service's one liver reader (`service.contours.read_liver_mask`) with the name
    map `LIVER_NAMES`: rt-utils rasterises an RTSTRUCT, highdicom places a SEG's frames.
    `headers`: the series' CT headers in volume order (`service.contours.ct_headers`) when the
    caller has them already; None: read from `series_files`.

    Raises:
        NoLiver: no ROI or segment is the liver.
        ContourError: the file is not a contour object we can read, or it cannot be placed on the series.
    """
    ds = pydicom.dcmread(path)
    try:
        if headers is None:
            headers = ct_headers(instance.path for instance in series_files.instances)
        _, mask = read_liver_mask(ds, headers, LIVER_NAMES)
    except ContourProblem as problem:
        error = NoLiver if problem.status == ContourStatus.NO_LIVER else ContourError
        raise error(f"{Path(path).name}: {problem.reason}") from None
    return LiverContour(
        series_files.series_instance_uid,
        Path(path),
        {str(header.SOPInstanceUID): mask[n] for n, header in enumerate(headers)},
    )


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
    cached_uid: str | None = None  # the CT series whose headers are in `cached_headers`
    cached_headers: list[pydicom.Dataset] = []
    for inst in objects:
        try:
            refs = contour_references(pydicom.dcmread(inst.path, stop_before_pixels=True))
            uids = [uid for uid in refs.series_instance_uids if uid in ct_by_uid]
            if not uids:
                raise ContourError(f"{inst.path.name}: refers to no CT series that was found")
            if uids[0] != cached_uid:  # a series' contour objects lie side by side in path order
                cached_uid, cached_headers = uids[0], ct_headers(i.path for i in ct_by_uid[uids[0]].instances)
            contour = read_liver_contour(inst.path, ct_by_uid[uids[0]], cached_headers)
        except ContourProblem as exc:  # the CT series' headers (`ct_headers`)
            log.warning("skipping contour: %s: %s", inst.path.name, exc.reason)
            continue
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
