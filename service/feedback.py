"""The dosimetrists' contour feedback as labels for the gate: what was recorded, and what the gate knew then.

A verdict (`ContourFeedback`) says whether the auto contour of a series version was, or would have
been, acceptable: `no` means the auto-segmentation would have failed, so the series had to go to
manual contouring; `yes` means the gate could have let it through; `not_applicable` is no label.
`gatekeeper feedback list` exports the rows; `gatekeeper evaluate gate --feedback` (models/) compares
the gate's signals with them. No patient data here: ids, UIDs, scores, user names, the verdict and
the dosimetrist's note.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import ContourFeedback, Series, SeriesScore, User, WorklistItem


@dataclass(frozen=True)
class FeedbackLabel:
    """One recorded verdict with the series version it concerns and the gate's signals for that version.

    `detector_*` are from the newest detector result of the series version (None: never scored);
    `geometry_findings` counts the ingest geometry findings (None: not checked); `route` and
    `route_reason` are where the pipeline sent it; `worklist_reason` is the worklist item's reason.
    """

    id: int
    created_at: dt.datetime
    user: str
    verdict: str  # yes | no | not_applicable
    note: str | None
    series_id: int
    series_instance_uid: str
    series_version: int
    worklist_item_id: int | None
    route: str | None
    route_reason: str | None
    worklist_reason: str | None
    detector_model_version: str | None
    detector_score: float | None
    detector_threshold: float | None
    detector_flagged: bool | None
    geometry_findings: int | None

    def to_json(self) -> dict[str, Any]:
        """The label as JSON-ready values (the time as ISO 8601 UTC)."""
        values = asdict(self)
        values["created_at"] = self.created_at.isoformat()
        return values


def feedback_labels(*, session: Session) -> list[FeedbackLabel]:
    """Every recorded verdict, oldest first, with the gate's signals for its series version."""
    rows = session.execute(
        select(ContourFeedback, User.name, Series, WorklistItem.reason)
        .join(User, User.id == ContourFeedback.user_id)
        .join(Series, Series.id == ContourFeedback.series_id)
        .outerjoin(WorklistItem, WorklistItem.series_id == Series.id)
        .order_by(ContourFeedback.created_at, ContourFeedback.id)
    ).all()
    scores: dict[int, SeriesScore] = {}
    series_ids = sorted({series.id for _, _, series, _ in rows})
    if series_ids:
        for score in session.scalars(
            select(SeriesScore)
            .where(SeriesScore.series_id.in_(series_ids))
            .order_by(SeriesScore.created_at, SeriesScore.id)
        ):
            scores[score.series_id] = score  # the newest wins
    labels = []
    for feedback, user_name, series, worklist_reason in rows:
        latest = scores.get(series.id)
        labels.append(
            FeedbackLabel(
                id=feedback.id,
                created_at=feedback.created_at,
                user=user_name,
                verdict=feedback.verdict,
                note=feedback.note,
                series_id=series.id,
                series_instance_uid=series.series_instance_uid,
                series_version=series.version,
                worklist_item_id=feedback.worklist_item_id,
                route=series.route,
                route_reason=series.route_reason,
                worklist_reason=worklist_reason,
                detector_model_version=latest.model_version if latest else None,
                detector_score=latest.score if latest else None,
                detector_threshold=latest.threshold if latest else None,
                detector_flagged=latest.flagged if latest else None,
                geometry_findings=len(series.geometry_findings) if series.geometry_findings is not None else None,
            )
        )
    return labels


def latest_per_series(labels: Iterable[FeedbackLabel]) -> list[FeedbackLabel]:
    """The newest verdict of each series version (a later verdict corrects an earlier one), oldest first."""
    latest: dict[int, FeedbackLabel] = {}
    for label in sorted(labels, key=lambda lab: (lab.created_at, lab.id)):
        latest[label.series_id] = label
    return sorted(latest.values(), key=lambda lab: (lab.created_at, lab.id))
