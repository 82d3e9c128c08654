"""The listener's assembler round: pending `ContourObject` rows for stored contour instances, and their queue claims."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.contours.matching import CONTOUR_SOP_CLASSES
from service.db.session import rows_changed
from service.db.tables import ContourObject, ContourStatus, Instance, Series
from service.lifecycle import SeriesState

log = logging.getLogger(__name__)

S = SeriesState


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
