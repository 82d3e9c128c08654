"""The pipeline's contour stage: match, rasterise and pool every pending contour object of a stored series.

Objects that cannot be used are kept with a status and a reason (`ContourStatus`) and never crash
a worker. A later contour for the same CT series supersedes the earlier one: both rows are kept,
the earlier marked `superseded` (contour and pool entry). No patient data in logs or events.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pydicom
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.contours.common import ContourProblem
from service.contours.matching import CONTOURABLE_STATES, contour_references, find_contoured_series
from service.contours.pool import mask_path, write_mask
from service.contours.reading import ct_headers, rasterise
from service.db.session import rows_changed
from service.db.tables import (
    ContourObject,
    ContourStatus,
    Instance,
    PoolEntry,
    Series,
    WorklistItem,
    WorklistStatus,
    utc_now,
)
from service.ingest.checks import CT_IMAGE_STORAGE
from service.lifecycle import SeriesState, transition
from service.settings import Settings

log = logging.getLogger(__name__)

S = SeriesState

MAX_REASON_LENGTH = 500


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
    sha256 = write_mask(settings.storage_dir / relative_mask, mask, sop_instance_uids)
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
