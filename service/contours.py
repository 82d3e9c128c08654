"""Returned contours and the training pool: what a person contoured comes back and teaches the models.

When the treatment planning system or the PACS sends back an RT Structure Set or a Segmentation,
the listener stores it like any instance and completes its series into state `stored` (nothing
more happens inside C-STORE). The listener's assembler round then gives every such instance a
`ContourObject` row (status `pending`) and queues the pipeline's *contour* stage for its series
(`service.pipeline.queue_contours`, `service.pipeline.match_contours`), which comes here:

1. **Match** (`find_contoured_series`): the CT series the object refers to — by its referenced
   SeriesInstanceUID (RTSTRUCT: Referenced Frame of Reference → RT Referenced Study → RT Referenced
   Series; SEG: ReferencedSeriesSequence), else by the series holding its referenced SOP
   instances, else by its Frame of Reference when exactly one worklisted series has it. The newest
   version we hold counts; it must be on the worklist (`worklisted`, `claimed`, `done`) or already
   `contoured`.
2. **Find the liver** (`liver_structure`): the first name of `Settings.liver_structure_names`
   (compared without letter case and surrounding blanks) among the ROI names (RTSTRUCT) or segment
   labels (SEG); a SEG segment of type SCT 10200004 (Liver) also counts.
3. **Rasterise** onto the CT grid: rt-utils for RT Structure Sets (`rasterise_rtstruct`; contours
   without a Contour Image Sequence are placed on the slice whose plane holds them), highdicom for
   Segmentations (`rasterise_seg`). The mask is bool [slice, row, column] in volume order.
4. **Pool**: the mask file, a `PoolEntry`, the series and its worklist item `contoured` (through
   `service.lifecycle.transition`). A later contour for the same CT series supersedes the earlier
   one: both rows are kept, the earlier marked `superseded` (contour and pool entry).

Objects that cannot be used are kept with a status and a reason (`ContourStatus`: unmatched,
no_liver, empty, unreadable) and never crash a worker; `gatekeeper contours list` shows them.

The pool, for whoever trains from it
------------------------------------
Table `pool_entry` (`service.db.tables.PoolEntry`), one row per matched contour:

==========================  ==================================================================
column                      meaning
==========================  ==================================================================
series_id                   the CT series version (`series.id`) the mask belongs to
series_instance_uid         its SeriesInstanceUID
contour_id                  the `contour_object` row; `contour_sop_instance_uid` its SOP UID
structure_name              the ROI name / segment label taken as the liver
mask_path, mask_sha256      the mask file, relative to `Settings.storage_dir`, and its SHA-256
num_slices, liver_voxels    the mask's slices and its number of liver voxels
calling_ae_title            the AE that sent the contour; `received_at` when it arrived
contoured_by                `app_user.id` of the dosimetrist holding the worklist item (or NULL)
superseded                  True once a later contour of the same CT series replaced it
==========================  ==================================================================

The training pool is the rows with `superseded` false: one per CT series (`pool_entries`).
Each mask file `pool/<series_id>/liver-<contour_id>.npz` (NumPy, compressed) holds `liver`
(uint8 [slice, row, column], 1 = liver) and `sop_instance_uids` (the CT slice of each mask
slice), slices head → feet as `service.dicom_series.load_series` orders them (`load_pool_mask`).

`gatekeeper pool export DIR` (`export_pool`) writes what `gatekeeper train segmenter --data DIR`
reads (models/segmenter/data.py: CT series plus a liver DICOM-SEG referencing them):

    DIR/pool.json                          every exported entry with its provenance (below)
    DIR/<NNNN>_pool<id>/ct/<NNNN>.dcm      the stored CT instances, byte for byte, in volume order
    DIR/<NNNN>_pool<id>/liver.seg.dcm      the mask as a DICOM-SEG: segment "Liver" (SCT 10200004),
                                           algorithm type MANUAL, referencing every CT instance

`pool.json`: `{"pool_export_version": 1, "exported_at": ISO time, "entries": [{"pool_entry_id",
"folder", "series_instance_uid", "series_version", "contour_sop_instance_uid", "structure_name",
"calling_ae_title", "contoured_by", "received_at", "num_slices", "liver_voxels", "mask_sha256",
"seg_sop_instance_uid"}]}`. It is deliberately not a phantom `manifest.json`, whose split rules
would leave out the (mostly anomalous) pool series: the trainer holds out a seeded 10 % instead.

No patient data in logs or events here: ids, UIDs, states, ROI names and counts only.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service import imaging
from service.db.session import rows_changed
from service.db.tables import (
    ContourObject,
    ContourStatus,
    Instance,
    PoolEntry,
    Series,
    User,
    WorklistItem,
    WorklistStatus,
    utc_now,
)
from service.ingest.checks import CT_IMAGE_STORAGE, RT_STRUCTURE_SET_STORAGE, SEGMENTATION_STORAGE
from service.lifecycle import SeriesState, transition
from service.settings import Settings
from service.uids import derived_uid

log = logging.getLogger(__name__)

S = SeriesState

#: The contour objects we look at, by SOP Class UID, with the Modality they carry.
CONTOUR_SOP_CLASSES = {RT_STRUCTURE_SET_STORAGE: "RTSTRUCT", SEGMENTATION_STORAGE: "SEG"}
#: States of a CT series version that a returned contour may be matched to.
CONTOURABLE_STATES = (S.WORKLISTED, S.CLAIMED, S.DONE, S.CONTOURED)
#: SNOMED CT code of the liver (Segmented Property Type of a SEG segment).
LIVER_SCT_CODE = "10200004"
#: Folder of the mask files under `Settings.storage_dir`.
POOL_DIR = "pool"
#: Version of the `pool.json` layout an export writes.
POOL_EXPORT_VERSION = 1
#: Namespace of the export SEGs' deterministic UIDs (`service.uids.derived_uid`).
UID_NAMESPACE = "ct-gatekeeper-pool"
MAX_REASON_LENGTH = 500


class ContourProblem(Exception):
    """A contour object cannot go into the pool; `status` says how it ends, the message why (no patient data)."""

    def __init__(self, status: ContourStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# --- the name map -------------------------------------------------------------------------------------


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


# --- what a contour object refers to ------------------------------------------------------------------


@dataclass(frozen=True)
class ContourReferences:
    """The CT a contour object says it was drawn on (any of the three may be empty)."""

    series_instance_uids: tuple[str, ...]
    sop_instance_uids: frozenset[str]
    frame_of_reference_uids: tuple[str, ...]


def _items(ds: Any, keyword: str) -> list[Any]:
    value = getattr(ds, keyword, None) if ds is not None else None
    try:
        return list(value) if value is not None else []
    except TypeError:
        return []


def _uid(ds: Any, keyword: str) -> str | None:
    value = getattr(ds, keyword, None)
    text = str(value).strip() if value is not None else ""
    return text or None


def contour_references(ds: Dataset) -> ContourReferences:
    """What `ds` (an RT Structure Set or a Segmentation) refers to; tolerant of missing sequences."""
    series: list[str] = []
    instances: set[str] = set()
    frames: list[str] = []

    def add(values: list[str | None], value: str | None) -> None:
        if value and value not in values:
            values.append(value)

    # RT Structure Set: Referenced Frame of Reference → RT Referenced Study → RT Referenced Series.
    for frame in _items(ds, "ReferencedFrameOfReferenceSequence"):
        add(frames, _uid(frame, "FrameOfReferenceUID"))  # type: ignore[arg-type]
        for study in _items(frame, "RTReferencedStudySequence"):
            for rt_series in _items(study, "RTReferencedSeriesSequence"):
                add(series, _uid(rt_series, "SeriesInstanceUID"))  # type: ignore[arg-type]
                for image in _items(rt_series, "ContourImageSequence"):
                    instances.add(_uid(image, "ReferencedSOPInstanceUID") or "")
    for roi in _items(ds, "StructureSetROISequence"):
        add(frames, _uid(roi, "ReferencedFrameOfReferenceUID"))  # type: ignore[arg-type]
    for roi_contour in _items(ds, "ROIContourSequence"):
        for contour in _items(roi_contour, "ContourSequence"):
            for image in _items(contour, "ContourImageSequence"):
                instances.add(_uid(image, "ReferencedSOPInstanceUID") or "")
    # Segmentation: Referenced Series Sequence, Frame of Reference, the frames' source images.
    for ref in _items(ds, "ReferencedSeriesSequence"):
        add(series, _uid(ref, "SeriesInstanceUID"))  # type: ignore[arg-type]
        for image in _items(ref, "ReferencedInstanceSequence"):
            instances.add(_uid(image, "ReferencedSOPInstanceUID") or "")
    for group in [*_items(ds, "SharedFunctionalGroupsSequence"), *_items(ds, "PerFrameFunctionalGroupsSequence")]:
        for derivation in _items(group, "DerivationImageSequence"):
            for source in _items(derivation, "SourceImageSequence"):
                instances.add(_uid(source, "ReferencedSOPInstanceUID") or "")
    if str(getattr(ds, "Modality", "")) != "RTSTRUCT":
        add(frames, _uid(ds, "FrameOfReferenceUID"))  # type: ignore[arg-type]
    instances.discard("")
    return ContourReferences(tuple(series), frozenset(instances), tuple(frames))


def _current_version(session: Session, series_instance_uid: str) -> Series | None:
    """The newest version of an image series we hold (not a stored SEG / RT Structure Set series)."""
    return session.scalars(
        select(Series)
        .where(
            Series.series_instance_uid == series_instance_uid,
            Series.superseded.is_(False),
            Series.state != S.STORED.value,
        )
        .order_by(Series.version.desc())
    ).first()


def find_contoured_series(session: Session, refs: ContourReferences) -> Series:
    """The CT series version a contour object belongs to, on the worklist (or contoured already).

    Tried in order: a referenced SeriesInstanceUID we hold; the series holding the referenced SOP
    instances; the one worklisted series in a referenced Frame of Reference.

    Raises:
        ContourProblem: (unmatched) it refers to nothing we hold, to several series, or to a series
            that is not on the worklist; the reason names the UIDs and the state.
    """
    series: Series | None = None
    for uid in refs.series_instance_uids:
        series = _current_version(session, uid)
        if series is not None:
            break
    if series is None and refs.sop_instance_uids:
        uids = session.scalars(
            select(Series.series_instance_uid)
            .join(Instance, Instance.series_id == Series.id)
            .where(Instance.sop_instance_uid.in_(sorted(refs.sop_instance_uids)), Series.state != S.STORED.value)
            .distinct()
        ).all()
        if len(uids) > 1:
            raise ContourProblem(
                ContourStatus.UNMATCHED, f"its referenced instances belong to {len(uids)} series: {', '.join(uids)}"
            )
        if uids:
            series = _current_version(session, uids[0])
    if series is None and refs.frame_of_reference_uids:
        candidates = session.scalars(
            select(Series).where(
                Series.frame_of_reference_uid.in_(refs.frame_of_reference_uids),
                Series.superseded.is_(False),
                Series.state.in_([s.value for s in CONTOURABLE_STATES]),
            )
        ).all()
        if len({c.series_instance_uid for c in candidates}) > 1:
            listed = ", ".join(sorted({c.series_instance_uid for c in candidates}))
            raise ContourProblem(
                ContourStatus.UNMATCHED,
                f"names no series, and its frame of reference holds {len(candidates)} worklisted series: {listed}",
            )
        if candidates:
            series = candidates[0]
    if series is None:
        named = refs.series_instance_uids or tuple(sorted(refs.frame_of_reference_uids))
        if not (refs.series_instance_uids or refs.sop_instance_uids or refs.frame_of_reference_uids):
            raise ContourProblem(
                ContourStatus.UNMATCHED, "it names no referenced series, instance or frame of reference"
            )
        what = "series" if refs.series_instance_uids else "frame of reference"
        raise ContourProblem(ContourStatus.UNMATCHED, f"refers to {what} {', '.join(named)}, which we never received")
    if series.state not in {s.value for s in CONTOURABLE_STATES}:
        raise ContourProblem(
            ContourStatus.UNMATCHED,
            f"refers to series {series.series_instance_uid} (version {series.version}), which is {series.state}, "
            "not on the worklist",
        )
    return series


# --- rasterising --------------------------------------------------------------------------------------


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
    for roi_contour in _items(ds, "ROIContourSequence"):
        if int(getattr(roi_contour, "ReferencedROINumber", -1)) != roi_number:
            continue
        kept = []
        for contour in _items(roi_contour, "ContourSequence"):
            if str(getattr(contour, "ContourGeometricType", "CLOSED_PLANAR")).strip() != "CLOSED_PLANAR":
                continue
            referenced = {_uid(i, "ReferencedSOPInstanceUID") for i in _items(contour, "ContourImageSequence")}
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
    names = [str(getattr(r, "ROIName", "")) for r in _items(rtstruct, "StructureSetROISequence")]
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
            {str(c.CodeValue) for c in _items(d, "SegmentedPropertyTypeCodeSequence")},
        )
        for d in _items(seg, "SegmentSequence")
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


def rasterise(ds: Dataset, headers: Sequence[Dataset], liver_names: Sequence[str]) -> tuple[str, np.ndarray]:
    """The liver of contour object `ds` on `headers`' grid (`rasterise_rtstruct` or `rasterise_seg`).

    Raises:
        ContourProblem: no_liver, empty (no liver voxel on these slices) or unreadable.
    """
    sop_class = str(getattr(ds, "SOPClassUID", ""))
    if sop_class == RT_STRUCTURE_SET_STORAGE:
        name, mask = rasterise_rtstruct(ds, headers, liver_names)
    elif sop_class == SEGMENTATION_STORAGE:
        name, mask = rasterise_seg(ds, headers, liver_names)
    else:
        raise ContourProblem(ContourStatus.UNREADABLE, f"SOP Class {sop_class or '(none)'} is not a contour object")
    if not mask.any():
        raise ContourProblem(ContourStatus.EMPTY, f"structure {name!r} has no liver voxel on the series' CT slices")
    return name, mask


# --- registration (the listener's assembler round) -----------------------------------------------------


def register_received_contours(*, sessions: sessionmaker[Session]) -> list[int]:
    """Give every contour instance of a `stored` series a pending `ContourObject`; return their series ids.

    Reads the database only (no file). Two processes at once: the unique instance id lets one win.
    """
    with sessions() as session:
        rows = session.execute(
            select(
                Instance.id,
                Instance.series_id,
                Instance.sop_instance_uid,
                Instance.sop_class_uid,
                Instance.received_at,
                Series.calling_ae_title,
            )
            .join(Series, Series.id == Instance.series_id)
            .where(
                Series.state == S.STORED.value,
                Instance.sop_class_uid.in_(list(CONTOUR_SOP_CLASSES)),
                ~exists().where(ContourObject.instance_id == Instance.id),
            )
            .order_by(Instance.id)
        ).all()
    by_series: dict[int, list[Any]] = {}
    for row in rows:
        by_series.setdefault(row.series_id, []).append(row)
    registered = []
    for series_id, instances in by_series.items():
        try:
            with sessions.begin() as session:
                for row in instances:
                    session.add(
                        ContourObject(
                            series_id=series_id,
                            instance_id=row.id,
                            sop_instance_uid=row.sop_instance_uid,
                            sop_class_uid=row.sop_class_uid,
                            modality=CONTOUR_SOP_CLASSES[row.sop_class_uid],
                            calling_ae_title=row.calling_ae_title,
                            received_at=row.received_at,
                            status=ContourStatus.PENDING.value,
                        )
                    )
        except IntegrityError:
            continue  # another process registered them meanwhile
        log.info("series id %s: %d returned contour object(s) registered", series_id, len(instances))
        registered.append(series_id)
    return registered


def claim_due_contour_series(
    *, sessions: sessionmaker[Session], resend_before: dt.datetime, now: dt.datetime
) -> list[int]:
    """Series ids with pending contour objects never queued or queued before `resend_before`; claimed.

    The claim sets `queued_at` = `now` on those objects, so two processes never both send one.
    """
    with sessions() as session:
        due = session.scalars(
            select(ContourObject.series_id)
            .where(
                ContourObject.status == ContourStatus.PENDING.value,
                ContourObject.queued_at.is_(None) | (ContourObject.queued_at < resend_before),
            )
            .distinct()
            .order_by(ContourObject.series_id)
        ).all()
    claimed = []
    for series_id in due:
        with sessions.begin() as session:
            changed = rows_changed(
                session.execute(
                    update(ContourObject)
                    .where(
                        ContourObject.series_id == series_id,
                        ContourObject.status == ContourStatus.PENDING.value,
                        ContourObject.queued_at.is_(None) | (ContourObject.queued_at < resend_before),
                    )
                    .values(queued_at=now)
                    .execution_options(synchronize_session=False)
                )
            )
        if changed:
            claimed.append(series_id)
    return claimed


def release_contour_claim(*, sessions: sessionmaker[Session], series_id: int, claimed_at: dt.datetime) -> None:
    """Give back a claim whose message the broker did not take: the next round sends it again."""
    with sessions.begin() as session:
        session.execute(
            update(ContourObject)
            .where(ContourObject.series_id == series_id, ContourObject.queued_at == claimed_at)
            .values(queued_at=None)
            .execution_options(synchronize_session=False)
        )


# --- the contour stage ---------------------------------------------------------------------------------


def _finish(
    sessions: sessionmaker[Session], contour_id: int, status: ContourStatus, reason: str | None, **values: Any
) -> bool:
    with sessions.begin() as session:
        return bool(
            rows_changed(
                session.execute(
                    update(ContourObject)
                    .where(ContourObject.id == contour_id, ContourObject.status == ContourStatus.PENDING.value)
                    .values(
                        status=status.value,
                        reason=reason[:MAX_REASON_LENGTH] if reason else None,
                        processed_at=utc_now(),
                        **values,
                    )
                    .execution_options(synchronize_session=False)
                )
            )
        )


def mask_path(*, series_id: int, contour_id: int) -> str:
    """Where the mask of contour `contour_id` on CT series version `series_id` lives, relative to storage."""
    return f"{POOL_DIR}/{series_id}/liver-{contour_id}.npz"


def _write_mask(path: Path, mask: np.ndarray, sop_instance_uids: Sequence[str]) -> str:
    """Write the mask file atomically; return the SHA-256 of its bytes."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, liver=mask.astype(np.uint8), sop_instance_uids=np.array(sop_instance_uids, dtype=str))
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class PoolMask:
    """A pool entry's mask: bool [slice, row, column], head → feet, and the CT slice of each."""

    liver: np.ndarray
    sop_instance_uids: tuple[str, ...]


def load_pool_mask(*, settings: Settings, entry: PoolEntry) -> PoolMask:
    """The mask of `entry`, read from its file under `settings.storage_dir`.

    Raises:
        ValueError: the file is missing, changed since it was written (SHA-256), or malformed.
    """
    path = settings.storage_dir / entry.mask_path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"pool entry {entry.id}: mask file {entry.mask_path} cannot be read: {exc}") from None
    if hashlib.sha256(data).hexdigest() != entry.mask_sha256:
        raise ValueError(f"pool entry {entry.id}: mask file {entry.mask_path} changed since it was written")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        liver, uids = npz["liver"].astype(bool), tuple(str(u) for u in npz["sop_instance_uids"])
    if liver.ndim != 3 or len(uids) != liver.shape[0]:
        raise ValueError(f"pool entry {entry.id}: mask {liver.shape} does not match {len(uids)} slice UIDs")
    return PoolMask(liver, uids)


def process_contour_series(
    *, sessions: sessionmaker[Session], settings: Settings, series_id: int
) -> list[ContourStatus]:
    """The contour stage for the stored contour series version `series_id`: every pending object of it.

    Returns the status each object ended in (empty: nothing was pending — a duplicate message).
    Nothing here raises for a bad object; database errors propagate (the objects stay pending and
    are queued again after `queue_resend_after_s`).
    """
    with sessions() as session:
        pending = session.scalars(
            select(ContourObject.id)
            .where(ContourObject.series_id == series_id, ContourObject.status == ContourStatus.PENDING.value)
            .order_by(ContourObject.received_at, ContourObject.id)
        ).all()
    return [process_contour(sessions=sessions, settings=settings, contour_id=contour_id) for contour_id in pending]


def process_contour(*, sessions: sessionmaker[Session], settings: Settings, contour_id: int) -> ContourStatus:
    """Match one pending contour object, rasterise its liver and add it to the pool; return its status.

    Returns the object's status afterwards (its current one when it was not pending).
    """
    with sessions() as session:
        contour = session.get(ContourObject, contour_id)
        if contour is None:
            return ContourStatus.UNMATCHED
        if contour.status != ContourStatus.PENDING.value:
            return ContourStatus(contour.status)
        instance = session.get(Instance, contour.instance_id)
        relative = instance.relative_path if instance is not None else None
    if relative is None:
        _finish(sessions, contour_id, ContourStatus.UNREADABLE, "its stored instance is gone")
        return ContourStatus.UNREADABLE
    try:
        ds = pydicom.dcmread(settings.storage_dir / relative)
        refs = contour_references(ds)
    except Exception as exc:  # any decoding failure: the object is unreadable, the worker carries on
        reason = f"not readable as DICOM: {type(exc).__name__}: {exc}"
        _finish(sessions, contour_id, ContourStatus.UNREADABLE, reason)
        log.warning("contour %s: unreadable (%s)", contour_id, type(exc).__name__)
        return ContourStatus.UNREADABLE
    known = {
        "referenced_series_instance_uid": refs.series_instance_uids[0] if refs.series_instance_uids else None,
        "frame_of_reference_uid": refs.frame_of_reference_uids[0] if refs.frame_of_reference_uids else None,
    }
    try:
        with sessions() as session:
            series = find_contoured_series(session, refs)
            target_id, target_uid = series.id, series.series_instance_uid
            paths = [
                settings.storage_dir / path
                for path in session.scalars(
                    select(Instance.relative_path).where(
                        Instance.series_id == target_id, Instance.sop_class_uid == CT_IMAGE_STORAGE
                    )
                )
            ]
        try:
            headers = ct_headers(paths)
            name, mask = rasterise(ds, headers, settings.liver_structure_names)
        except ContourProblem:
            raise
        except Exception as exc:  # a contour object or CT header we cannot make sense of
            raise ContourProblem(ContourStatus.UNREADABLE, f"cannot rasterise: {type(exc).__name__}: {exc}") from None
    except ContourProblem as problem:
        _finish(sessions, contour_id, problem.status, problem.reason, **known)
        log.info("contour %s: %s", contour_id, problem.status.value)
        return problem.status
    relative_mask = mask_path(series_id=target_id, contour_id=contour_id)
    sop_instance_uids = [str(h.SOPInstanceUID) for h in headers]
    sha256 = _write_mask(settings.storage_dir / relative_mask, mask, sop_instance_uids)
    return _add_to_pool(
        sessions=sessions,
        contour_id=contour_id,
        target_id=target_id,
        target_uid=target_uid,
        structure_name=name,
        mask=mask,
        relative_mask=relative_mask,
        sha256=sha256,
        known=known,
    )


def _add_to_pool(
    *,
    sessions: sessionmaker[Session],
    contour_id: int,
    target_id: int,
    target_uid: str,
    structure_name: str,
    mask: np.ndarray,
    relative_mask: str,
    sha256: str,
    known: dict[str, Any],
) -> ContourStatus:
    """The pool entry, the supersession and the `contoured` state, in one transaction."""
    now = utc_now()
    with sessions() as session:
        # Lock the CT series row: two contours of one series are pooled one after the other.
        session.execute(select(Series.id).where(Series.id == target_id).with_for_update())
        contour = session.get(ContourObject, contour_id)
        if contour is None or contour.status != ContourStatus.PENDING.value:
            return ContourStatus(contour.status) if contour is not None else ContourStatus.UNMATCHED
        item = session.scalar(select(WorklistItem).where(WorklistItem.series_id == target_id))
        active = session.execute(
            select(PoolEntry, ContourObject)
            .join(ContourObject, ContourObject.id == PoolEntry.contour_id)
            .where(PoolEntry.series_instance_uid == target_uid, PoolEntry.superseded.is_(False))
        ).all()
        mine = (contour.received_at, contour.id)
        newer = [other for _, other in active if (other.received_at, other.id) > mine]
        replaced = [(entry, other) for entry, other in active if (other.received_at, other.id) < mine]
        for entry, other in replaced:
            entry.superseded = True
            other.status = ContourStatus.SUPERSEDED.value
            other.reason = f"superseded by the later contour {contour.sop_instance_uid}"
        status = ContourStatus.SUPERSEDED if newer else ContourStatus.MATCHED
        contour.status = status.value
        contour.reason = f"superseded on arrival by the later contour {newer[0].sop_instance_uid}" if newer else None
        contour.matched_series_id = target_id
        contour.structure_name = structure_name
        contour.processed_at = now
        for key, value in known.items():
            setattr(contour, key, value)
        session.add(
            PoolEntry(
                series_id=target_id,
                contour_id=contour_id,
                series_instance_uid=target_uid,
                contour_sop_instance_uid=contour.sop_instance_uid,
                structure_name=structure_name,
                mask_path=relative_mask,
                mask_sha256=sha256,
                num_slices=int(mask.shape[0]),
                liver_voxels=int(mask.sum()),
                calling_ae_title=contour.calling_ae_title,
                contoured_by=item.claimed_by if item is not None else None,
                received_at=contour.received_at,
                created_at=now,
                superseded=bool(newer),
            )
        )
        session.flush()
        moved = transition(
            session=session,
            series_id=target_id,
            source=CONTOURABLE_STATES,
            target=S.CONTOURED,
            detail={
                "contour_id": contour_id,
                "contour_sop_instance_uid": contour.sop_instance_uid,
                "modality": contour.modality,
                "calling_ae_title": contour.calling_ae_title,
                "liver_voxels": int(mask.sum()),
                "superseded_contours": [other.id for _, other in replaced],
                "superseded_on_arrival": bool(newer),
            },
        )
        if moved and item is not None:
            item.status = WorklistStatus.CONTOURED.value
        if moved:
            session.commit()
        else:
            session.rollback()
    if not moved:  # a new version of the CT series arrived meanwhile, or it left the worklist
        _finish(
            sessions,
            contour_id,
            ContourStatus.UNMATCHED,
            f"series {target_uid} changed (new version or state) while the contour was being matched",
            **known,
        )
        return ContourStatus.UNMATCHED
    log.info(
        "contour %s matched to series id %s (%d liver voxels)%s",
        contour_id,
        target_id,
        int(mask.sum()),
        "; superseded on arrival by a later contour" if status == ContourStatus.SUPERSEDED else "",
    )
    return status


# --- listing -------------------------------------------------------------------------------------------


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def contour_listing(*, session: Session) -> list[dict[str, Any]]:
    """Every received contour object, oldest first, as JSON-ready dicts (no patient data)."""
    rows = session.execute(
        select(ContourObject, Series.series_instance_uid, Series.version)
        .outerjoin(Series, Series.id == ContourObject.matched_series_id)
        .order_by(ContourObject.received_at, ContourObject.id)
    ).all()
    return [
        {
            "id": contour.id,
            "sop_instance_uid": contour.sop_instance_uid,
            "modality": contour.modality,
            "calling_ae_title": contour.calling_ae_title,
            "received_at": _iso(contour.received_at),
            "status": contour.status,
            "reason": contour.reason,
            "referenced_series_instance_uid": contour.referenced_series_instance_uid,
            "frame_of_reference_uid": contour.frame_of_reference_uid,
            "matched_series_instance_uid": uid,
            "matched_series_version": version,
            "structure_name": contour.structure_name,
            "processed_at": _iso(contour.processed_at),
        }
        for contour, uid, version in rows
    ]


def pool_entries(*, session: Session, include_superseded: bool = False) -> list[PoolEntry]:
    """The training pool, oldest first: one entry per CT series (with `include_superseded`, every entry)."""
    query = select(PoolEntry).order_by(PoolEntry.received_at, PoolEntry.id)
    if not include_superseded:
        query = query.where(PoolEntry.superseded.is_(False))
    return list(session.scalars(query))


def pool_listing(*, session: Session, include_superseded: bool = False) -> list[dict[str, Any]]:
    """`pool_entries` as JSON-ready dicts, with the series version and the contouring user's name."""
    entries = pool_entries(session=session, include_superseded=include_superseded)
    series_ids = [e.series_id for e in entries]
    versions = {
        i: v for i, v in session.execute(select(Series.id, Series.version).where(Series.id.in_(series_ids))).tuples()
    }
    users = {i: name for i, name in session.execute(select(User.id, User.name)).tuples()}
    return [
        {
            "id": e.id,
            "series_instance_uid": e.series_instance_uid,
            "series_version": versions.get(e.series_id),
            "contour_sop_instance_uid": e.contour_sop_instance_uid,
            "structure_name": e.structure_name,
            "num_slices": e.num_slices,
            "liver_voxels": e.liver_voxels,
            "mask_path": e.mask_path,
            "mask_sha256": e.mask_sha256,
            "calling_ae_title": e.calling_ae_title,
            "contoured_by": users.get(e.contoured_by) if e.contoured_by is not None else None,
            "received_at": _iso(e.received_at),
            "created_at": _iso(e.created_at),
            "superseded": e.superseded,
        }
        for e in entries
    ]


# --- export --------------------------------------------------------------------------------------------


def build_pool_seg(*, source_images: Sequence[Dataset], mask: np.ndarray, contour_sop_instance_uid: str) -> Dataset:
    """The manual liver contour of one pool entry as a BINARY DICOM-SEG for training.

    One segment "Liver" (SCT 10200004), algorithm type MANUAL, referencing every source CT
    instance in its Frame of Reference; UIDs derived from the contour's SOP Instance UID.

    Raises:
        ValueError: `mask` does not match `source_images` (highdicom's checks).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    liver = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Liver",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Liver,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    return hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=mask.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[liver],
        series_instance_uid=derived_uid(UID_NAMESPACE, "seg-series", contour_sop_instance_uid),
        series_number=9902,
        sop_instance_uid=derived_uid(UID_NAMESPACE, "seg-instance", contour_sop_instance_uid),
        instance_number=1,
        manufacturer="CT Gatekeeper",
        manufacturer_model_name="training pool export",
        software_versions="1",
        device_serial_number="1",
        series_description="LIVER MANUAL CONTOUR (POOL)",
        content_label="LIVER_POOL",
        content_description="Returned manual liver contour, from the training pool",
        omit_empty_frames=True,
    )


def export_pool(
    *, sessions: sessionmaker[Session], settings: Settings, out: Path, progress: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Write the training pool (one entry per CT series) to `out` in the layout of the module docstring.

    Returns the `pool.json` entries. `out` must not exist or be an empty folder.

    Raises:
        FileExistsError: `out` exists and is not an empty folder.
        ValueError: a mask file is missing or changed, or no longer matches its stored CT series.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder")
    with sessions() as session:
        entries = pool_entries(session=session)
        versions = {i: v for i, v in session.execute(select(Series.id, Series.version)).tuples()}
        users = {i: name for i, name in session.execute(select(User.id, User.name)).tuples()}
        files = {
            e.id: [
                settings.storage_dir / p
                for p in session.scalars(
                    select(Instance.relative_path).where(
                        Instance.series_id == e.series_id, Instance.sop_class_uid == CT_IMAGE_STORAGE
                    )
                )
            ]
            for e in entries
        }
    out.mkdir(parents=True, exist_ok=True)
    exported = []
    for n, entry in enumerate(entries):
        folder = f"{n:04d}_pool{entry.id}"
        pool_mask = load_pool_mask(settings=settings, entry=entry)
        paths_by_uid = {}
        for path in files[entry.id]:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            paths_by_uid[str(header.SOPInstanceUID)] = (path, header)
        missing = [uid for uid in pool_mask.sop_instance_uids if uid not in paths_by_uid]
        if missing:
            raise ValueError(f"pool entry {entry.id}: CT instance {missing[0]} of its mask is no longer stored")
        (out / folder / "ct").mkdir(parents=True)
        headers = []
        for i, uid in enumerate(pool_mask.sop_instance_uids):
            path, header = paths_by_uid[uid]
            shutil.copyfile(path, out / folder / "ct" / f"{i:04d}.dcm")
            headers.append(header)
        seg = build_pool_seg(
            source_images=headers, mask=pool_mask.liver, contour_sop_instance_uid=entry.contour_sop_instance_uid
        )
        seg.save_as(out / folder / "liver.seg.dcm", enforce_file_format=True)
        exported.append(
            {
                "pool_entry_id": entry.id,
                "folder": folder,
                "series_instance_uid": entry.series_instance_uid,
                "series_version": versions.get(entry.series_id),
                "contour_sop_instance_uid": entry.contour_sop_instance_uid,
                "structure_name": entry.structure_name,
                "calling_ae_title": entry.calling_ae_title,
                "contoured_by": users.get(entry.contoured_by) if entry.contoured_by is not None else None,
                "received_at": _iso(entry.received_at),
                "num_slices": entry.num_slices,
                "liver_voxels": entry.liver_voxels,
                "mask_sha256": entry.mask_sha256,
                "seg_sop_instance_uid": str(seg.SOPInstanceUID),
            }
        )
        if progress is not None:
            progress(f"{n + 1}/{len(entries)} {folder}: {len(headers)} slices")
    document = {"pool_export_version": POOL_EXPORT_VERSION, "exported_at": utc_now().isoformat(), "entries": exported}
    (out / "pool.json").write_text(json.dumps(document, indent=1) + "\n")
    return exported
