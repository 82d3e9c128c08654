"""Series assembly: a series is complete after a quiet period with no new instance.

The quiet period is `Settings.quiet_period_for(calling AE)`. It runs from the later of the last
received instance and the start of this listener process, so that after a restart every series
that was still receiving gets a full quiet period for the sender's retry: nothing is completed
half-received because we were down. An operator can force completion (`gatekeeper series complete`).

Completion checks the geometry of image series (findings recorded, never fatal) and moves the
series to `complete` (queued by `queue.queue_due_series`) or, for SEG and RT Structure Set
series, to `stored`.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import Instance, Series, SeriesEvent, utc_now
from service.ingest.checks import IMAGE_SOP_CLASSES
from service.ingest.geometry import check_geometry, planes_from_files
from service.ingest.storage import InstanceStore
from service.lifecycle import SeriesState, transition
from service.settings import Settings

log = logging.getLogger(__name__)


def complete_due_series(
    *, store: InstanceStore, settings: Settings, not_before: dt.datetime, now: dt.datetime | None = None
) -> list[int]:
    """Complete every receiving series whose quiet period has passed; return their ids.

    `not_before` is when this process started: the quiet period never ends earlier than
    `not_before + quiet period`.
    """
    now = now or utc_now()
    with store.sessions() as session:
        receiving = session.execute(
            select(Series.id, Series.calling_ae_title, Series.last_received_at).where(
                Series.state == SeriesState.RECEIVING.value
            )
        ).all()
    completed = []
    for series_id, calling_ae_title, last_received_at in receiving:
        quiet = dt.timedelta(seconds=settings.quiet_period_for(calling_ae_title))
        if max(last_received_at, not_before) + quiet <= now and complete_series(
            store=store, series_id=series_id, reason="quiet_period", quiet_until=now - quiet, not_before=not_before
        ):
            completed.append(series_id)
    return completed


def complete_series(
    *,
    store: InstanceStore,
    series_id: int,
    reason: str,
    quiet_until: dt.datetime | None = None,
    not_before: dt.datetime | None = None,
) -> bool:
    """Complete one receiving series version; False if it is not receiving (any more).

    With `quiet_until`, the series is completed only if nothing arrived after that time (checked
    under the series lock, so an instance arriving meanwhile keeps it open).
    """
    with store.write_lock(), store.sessions.begin() as session:
        series = session.get(Series, series_id, with_for_update=True)
        if series is None or series.state != SeriesState.RECEIVING.value:
            return False
        # Instances whose index commit a crash lost are still in the folder: never complete without them.
        store.index_unindexed_files(session, series)
        if quiet_until is not None and series.last_received_at > quiet_until:
            return False
        paths, sop_classes = _instance_files(session, store.storage_dir, series_id)
        is_image_series = any(sop_class in IMAGE_SOP_CLASSES for sop_class in sop_classes)
        findings: list[dict[str, str]] = []
        if is_image_series:
            image_paths = [p for p, c in zip(paths, sop_classes, strict=True) if c in IMAGE_SOP_CLASSES]
            findings = [f.as_dict() for f in check_geometry(planes_from_files(image_paths))]
        moved = transition(
            session=session,
            series_id=series_id,
            source=SeriesState.RECEIVING,
            target=SeriesState.COMPLETE if is_image_series else SeriesState.STORED,
            event="completed",
            detail={
                "reason": reason,
                "num_instances": series.num_instances,
                "first_received_at": series.first_received_at.isoformat(),
                "last_received_at": series.last_received_at.isoformat(),
            },
            values={"completed_at": utc_now(), "geometry_findings": findings if is_image_series else None},
        )
        if not moved:  # superseded meanwhile (cannot happen under the lock, but never complete twice)
            return False
        if is_image_series:
            session.add(SeriesEvent(series_id=series_id, kind="geometry_checked", detail={"findings": findings}))
    log.info(
        "series id %s complete (%s): %s instances, %s geometry finding(s)",
        series_id,
        reason,
        series.num_instances,
        len(findings),
    )
    for finding in findings:
        log.warning("series id %s geometry: %s", series_id, finding["message"])
    return True


def force_complete(*, store: InstanceStore, series_instance_uid: str) -> int | None:
    """Complete the receiving version of `series_instance_uid` now; return its id, or None if none receives."""
    with store.sessions() as session:
        series_id = session.scalars(
            select(Series.id)
            .where(Series.series_instance_uid == series_instance_uid, Series.state == SeriesState.RECEIVING.value)
            .order_by(Series.version.desc())
        ).first()
    if series_id is None:
        return None
    return series_id if complete_series(store=store, series_id=series_id, reason="forced") else None


def _instance_files(session: Session, storage_dir: Path, series_id: int) -> tuple[list[Path], list[str]]:
    rows = session.execute(
        select(Instance.relative_path, Instance.sop_class_uid).where(Instance.series_id == series_id)
    ).all()
    return [storage_dir / path for path, _ in rows], [sop_class for _, sop_class in rows]
