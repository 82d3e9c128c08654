"""Stage *start*: a worker took a completed series version from the ingest queue; the score stage is next."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from service.celery_app import DONE, Next
from service.lifecycle import SeriesState, transition

log = logging.getLogger(__name__)

S = SeriesState


def start(*, sessions: sessionmaker[Session], series_id: int, worker: str) -> Next:
    """Stage *start*: a worker took series version `series_id` from the ingest queue.

    Input: state `queued` (or `complete`). Output: state `scoring`, and the score stage to queue. A duplicate
    message (any other state, or superseded) changes nothing and queues nothing.
    """
    with sessions.begin() as session:
        # From `complete` too: the worker took the message before the publisher recorded it (`ingest.queue`).
        moved = transition(
            session=session,
            series_id=series_id,
            source=(S.COMPLETE, S.QUEUED),
            target=S.SCORING,
            detail={"worker": worker},
        )
    if not moved:
        log.info("series id %s is not queued (duplicate message or superseded); nothing to do", series_id)
        return DONE
    log.info("series id %s: scoring", series_id)
    return Next("score", series_id)
