"""Step 4's records: the mask files of the training pool and the listings of contours and pool entries.

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
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import ContourObject, PoolEntry, Series, User
from service.settings import Settings

#: Folder of the mask files under `Settings.storage_dir`.
POOL_DIR = "pool"


def mask_path(*, series_id: int, contour_id: int) -> str:
    """Where the mask of contour `contour_id` on CT series version `series_id` lives, relative to storage."""
    return f"{POOL_DIR}/{series_id}/liver-{contour_id}.npz"


def write_mask(path: Path, mask: np.ndarray, sop_instance_uids: Sequence[str]) -> str:
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


# --- listing ---------------------------------------------------------------------------------------


def iso_time(value: dt.datetime | None) -> str | None:
    """`value` in ISO 8601 (JSON-ready), or None."""
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
            "received_at": iso_time(contour.received_at),
            "status": contour.status,
            "reason": contour.reason,
            "referenced_series_instance_uid": contour.referenced_series_instance_uid,
            "frame_of_reference_uid": contour.frame_of_reference_uid,
            "matched_series_instance_uid": uid,
            "matched_series_version": version,
            "structure_name": contour.structure_name,
            "processed_at": iso_time(contour.processed_at),
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
            "received_at": iso_time(e.received_at),
            "created_at": iso_time(e.created_at),
            "superseded": e.superseded,
        }
        for e in entries
    ]
