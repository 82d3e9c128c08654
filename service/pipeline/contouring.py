"""Stage *contour*: returned RTSTRUCT / SEG objects queued and matched to their worklisted CT series (`service.contours`)."""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy.orm import Session, sessionmaker

from service import contours
from service.celery_app import DONE, Next, Publisher
from service.db.tables import utc_now
from service.settings import Settings

log = logging.getLogger(__name__)


def queue_contours(
    *, sessions: sessionmaker[Session], settings: Settings, publisher: Publisher, now: dt.datetime | None = None
) -> list[int]:
    """Queue the contour stage for returned contours: run by the listener's assembler every round.

    Every contour instance of a `stored` series gets a pending `ContourObject`
    (`contours.register_received_contours`); each series with pending objects never sent, or sent
    longer than `queue_resend_after_s` ago, is claimed and its stage published. A refused
    publication gives the claim back. Returns the contour series ids published.
    """
    now = now or utc_now()
    contours.register_received_contours(sessions=sessions)
    resend_before = now - dt.timedelta(seconds=settings.queue_resend_after_s)
    published = []
    for series_id in contours.claim_due_contour_series(sessions=sessions, resend_before=resend_before, now=now):
        try:
            publisher.publish(Next("contour", series_id))
        except Exception:  # broker away: give the claim back; the next round tries again
            log.warning("could not queue the contour stage of series id %s", series_id, exc_info=True)
            contours.release_contour_claim(sessions=sessions, series_id=series_id, claimed_at=now)
            break
        published.append(series_id)
    return published


def match_contours(*, sessions: sessionmaker[Session], settings: Settings, series_id: int) -> Next:
    """Stage *contour*: match the returned contour objects of stored series `series_id` (`service.contours`).

    Input: a `stored` RTSTRUCT or SEG series with pending `ContourObject`s. Output: each object
    `matched` (a `PoolEntry`, its CT series and worklist item `contoured`), `superseded`, or kept
    with the reason it cannot be used. A duplicate message finds nothing pending and does nothing.
    """
    clock = utc_now()
    statuses = contours.process_contour_series(sessions=sessions, settings=settings, series_id=series_id)
    if statuses:
        log.info(
            "series id %s: %d contour object(s) in %.1f s: %s",
            series_id,
            len(statuses),
            (utc_now() - clock).total_seconds(),
            ", ".join(s.value for s in statuses),
        )
    return DONE
