"""Step 1, match: the CT series version a returned contour object was drawn on.

By its referenced SeriesInstanceUID (RTSTRUCT: Referenced Frame of Reference → RT Referenced
Study → RT Referenced Series; SEG: ReferencedSeriesSequence), else by the series holding its
referenced SOP instances, else by its Frame of Reference when exactly one worklisted series has it.
The newest version we hold counts; it must be on the worklist or already `contoured`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.contours.common import ContourProblem, element_uid, sequence_items
from service.db.tables import ContourStatus, Instance, Series
from service.ingest.checks import RT_STRUCTURE_SET_STORAGE, SEGMENTATION_STORAGE
from service.lifecycle import SeriesState

S = SeriesState

#: The contour objects we look at, by SOP Class UID, with the Modality they carry.
CONTOUR_SOP_CLASSES = {RT_STRUCTURE_SET_STORAGE: "RTSTRUCT", SEGMENTATION_STORAGE: "SEG"}
#: States of a CT series version that a returned contour may be matched to.
CONTOURABLE_STATES = (S.WORKLISTED, S.CLAIMED, S.DONE, S.CONTOURED)


@dataclass(frozen=True)
class ContourReferences:
    """The CT a contour object says it was drawn on (any of the three may be empty)."""

    series_instance_uids: tuple[str, ...]
    sop_instance_uids: frozenset[str]
    frame_of_reference_uids: tuple[str, ...]


def contour_references(ds: Dataset) -> ContourReferences:
    """What `ds` (an RT Structure Set or a Segmentation) refers to; tolerant of missing sequences."""
    series: list[str] = []
    instances: set[str] = set()
    frames: list[str] = []

    def add(values: list[str | None], value: str | None) -> None:
        if value and value not in values:
            values.append(value)

    # RT Structure Set: Referenced Frame of Reference → RT Referenced Study → RT Referenced Series.
    for frame in sequence_items(ds, "ReferencedFrameOfReferenceSequence"):
        add(frames, element_uid(frame, "FrameOfReferenceUID"))  # type: ignore[arg-type]
        for study in sequence_items(frame, "RTReferencedStudySequence"):
            for rt_series in sequence_items(study, "RTReferencedSeriesSequence"):
                add(series, element_uid(rt_series, "SeriesInstanceUID"))  # type: ignore[arg-type]
                for image in sequence_items(rt_series, "ContourImageSequence"):
                    instances.add(element_uid(image, "ReferencedSOPInstanceUID") or "")
    for roi in sequence_items(ds, "StructureSetROISequence"):
        add(frames, element_uid(roi, "ReferencedFrameOfReferenceUID"))  # type: ignore[arg-type]
    for roi_contour in sequence_items(ds, "ROIContourSequence"):
        for contour in sequence_items(roi_contour, "ContourSequence"):
            for image in sequence_items(contour, "ContourImageSequence"):
                instances.add(element_uid(image, "ReferencedSOPInstanceUID") or "")
    # Segmentation: Referenced Series Sequence, Frame of Reference, the frames' source images.
    for ref in sequence_items(ds, "ReferencedSeriesSequence"):
        add(series, element_uid(ref, "SeriesInstanceUID"))  # type: ignore[arg-type]
        for image in sequence_items(ref, "ReferencedInstanceSequence"):
            instances.add(element_uid(image, "ReferencedSOPInstanceUID") or "")
    for group in [
        *sequence_items(ds, "SharedFunctionalGroupsSequence"),
        *sequence_items(ds, "PerFrameFunctionalGroupsSequence"),
    ]:
        for derivation in sequence_items(group, "DerivationImageSequence"):
            for source in sequence_items(derivation, "SourceImageSequence"):
                instances.add(element_uid(source, "ReferencedSOPInstanceUID") or "")
    if str(getattr(ds, "Modality", "")) != "RTSTRUCT":
        add(frames, element_uid(ds, "FrameOfReferenceUID"))  # type: ignore[arg-type]
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
