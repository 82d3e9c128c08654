"""Shadow mode's end of the auto route (service/shadow.py): the series `withheld`, nothing sent, maybe a review."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import metrics
from service.db.tables import Route, RouteReason, WorklistItem, WorklistStatus
from service.lifecycle import SeriesState, transition
from service.settings import Settings
from service.shadow import SHADOW_REVIEW_QUESTION, selected_for_shadow_review

log = logging.getLogger(__name__)

S = SeriesState


def withhold(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    series_id: int,
    series_instance_uid: str,
    review: bool,
    detail: dict[str, Any],
) -> bool:
    """Shadow mode's end of the auto route: `segmenting` → `withheld` (`Series.route` auto), nothing sent.

    With `review`, and when `service.shadow.selected_for_shadow_review` chooses the series (a
    share `settings.shadow_review_share`), it also gets an open worklist item of reason
    "shadow_review" in the same transaction, on which a dosimetrist answers whether the auto
    contour is acceptable. The "withheld" event's `detail` says whether. False when the series was
    no longer `segmenting` (a duplicate message): nothing changed.
    """
    chosen = review and selected_for_shadow_review(series_instance_uid, settings.shadow_review_share)
    with sessions.begin() as session:
        moved = transition(
            session=session,
            series_id=series_id,
            source=S.SEGMENTING,
            target=S.WITHHELD,
            event="withheld",
            detail={**detail, "mode": "shadow", "shadow_review": chosen},
            values={"route": Route.AUTO.value, "route_reason": None},
        )
        if (
            moved
            and chosen
            and session.scalar(select(WorklistItem.id).where(WorklistItem.series_id == series_id)) is None
        ):
            session.add(
                WorklistItem(
                    series_id=series_id,
                    reason=RouteReason.SHADOW_REVIEW.value,
                    detail={"question": SHADOW_REVIEW_QUESTION, "segmenter_version": detail.get("segmenter_version")},
                    status=WorklistStatus.OPEN.value,
                )
            )
    if moved:
        metrics.record_route(Route.AUTO.value, None)
        log.info(
            "series id %s withheld (shadow mode)%s",
            series_id,
            "; on the worklist for a shadow review" if chosen else "",
        )
    return moved
