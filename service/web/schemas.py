"""What the worklist's JSON API answers (and its pages show), separate from the database tables.

Scores are the detector's anomaly scores: higher is more unusual; a series is flagged when its
score is above `threshold`. Slice indexes count in volume order, head → feet, from 0.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, Field, ValidationError

from service.db.tables import MAX_FEEDBACK_NOTE_LENGTH, SeriesScore, User
from service.suggest import informativeness
from service.web.crud import AuditRow, FeedbackRow, SeriesReview, WorklistRow

SORT_KEYS = ("age", "patient", "study_date", "description", "reason", "score", "status", "informative")


class SliceRange(BaseModel):
    """The slices whose own score is above the series threshold: first and last index, and how many."""

    first: int
    last: int
    count: int


class FindingOut(BaseModel):
    """One piece of the gate's evidence on a series (`service.gate.Finding`).

    `value` and `threshold` in the signal's units (NaN stored as None: a plain rule has no
    threshold); `fired`: it sent the series to manual contouring; `slices`: first and last slice
    index (head → feet) where it is strongest, None when global; `words`: the finding in plain words.
    """

    signal: str
    value: float | None
    threshold: float | None
    fired: bool
    slices: list[int] | None
    words: str


class GateOut(BaseModel):
    """The gate's decision on a series version, after segmentation: where it sent it, why, on what evidence."""

    manual: bool  # True: to the worklist (or withheld, an off-target series), the segmentation kept as a draft
    reason: str | None
    fused: float | None  # the fused statistic and its threshold; None for a rules-only gate
    fused_threshold: float | None
    gate_version: str | None
    segmenter_version: str | None
    detector_version: str | None
    draft: str | None  # the draft SEG (relative to the storage folder): stored, never sent; None when none
    findings: list[FindingOut]  # every signal computed, fired or not

    @classmethod
    def from_detail(cls, detail: dict[str, Any] | None) -> GateOut | None:
        """From a recorded decision (`crud.gate_decision`, or a worklist item's detail); None if it has none."""
        if not detail or not isinstance(detail.get("gate"), dict):
            return None
        gate = detail["gate"]
        try:
            return cls(
                manual=bool(gate.get("manual")),
                reason=gate.get("reason"),
                fused=gate.get("fused"),
                fused_threshold=gate.get("fused_threshold"),
                gate_version=gate.get("gate_version") or detail.get("gate_version"),
                segmenter_version=detail.get("segmenter_version"),
                detector_version=detail.get("detector_version"),
                draft=detail.get("draft"),
                findings=[FindingOut.model_validate(f) for f in gate.get("findings") or []],
            )
        except ValidationError:
            return None


class WorklistEntry(BaseModel):
    """One series waiting for (or done with) manual contouring."""

    id: int
    series_instance_uid: str
    series_version: int
    reason: str  # a route reason (anomaly, geometry, unreadable, no_liver, ... the gate's), or shadow_review
    detail: dict[str, Any]
    findings: list[FindingOut]  # the gate's findings that fired: why the series is here, in plain words
    status: str  # open | claimed | done | contoured
    score: float | None  # None when the series was never scored
    threshold: float | None
    flagged_slices: SliceRange | None
    num_slices: int | None
    patient_name: str | None
    patient_id: str | None
    study_date: dt.date | None
    series_description: str | None
    created_at: dt.datetime
    age_s: float  # seconds on the worklist, until now or until done
    claimed_by: str | None
    claimed_at: dt.datetime | None
    done_at: dt.datetime | None
    assigned_to: str | None  # the user an admin assigned it to: only they or an admin may claim it
    assigned_at: dt.datetime | None
    url: str  # the series page

    @classmethod
    def from_row(cls, row: WorklistRow, *, now: dt.datetime) -> WorklistEntry:
        item, series, score = row.item, row.series, row.score
        end = item.done_at or now
        return cls(
            id=item.id,
            series_instance_uid=series.series_instance_uid,
            series_version=series.version,
            reason=item.reason,
            detail=item.detail or {},
            findings=fired_findings(item.detail),
            status=item.status,
            score=score.score if score else None,
            threshold=score.threshold if score else None,
            flagged_slices=flagged_slice_range(score),
            num_slices=len(score.slices) if score else None,
            patient_name=series.patient_name,
            patient_id=series.patient_id,
            study_date=series.study_date,
            series_description=series.series_description,
            created_at=item.created_at,
            age_s=max(0.0, (end - item.created_at).total_seconds()),
            claimed_by=row.claimed_by,
            claimed_at=item.claimed_at,
            done_at=item.done_at,
            assigned_to=row.assigned_to,
            assigned_at=item.assigned_at,
            url=series_url(series.series_instance_uid, series.version),
        )


class SliceScoreOut(BaseModel):
    index: int
    sop_instance_uid: str | None
    position: float | list[float] | None  # as stored by the scorer (mm along the body axis, or IPP)
    score: float


class TopSlice(BaseModel):
    """A highest-scoring slice and the URL of its image with the residual heat map over it."""

    index: int
    score: float
    sop_instance_uid: str | None
    has_residual_map: bool
    image_url: str


class SeriesDetail(BaseModel):
    """One series version: where the pipeline sent it, its scores and its worklist item."""

    series_instance_uid: str
    version: int
    latest_version: int
    state: str
    route: str | None  # auto | worklist, once decided (None and a reason: withheld, an off-target series)
    route_reason: str | None
    gate: GateOut | None  # the gate's decision after segmentation; None before it (or unreadable, forward mode)
    modality: str
    num_instances: int
    completed_at: dt.datetime | None
    patient_name: str | None
    patient_id: str | None
    study_date: dt.date | None
    series_description: str | None
    geometry_findings: list[dict[str, Any]] | None
    model_version: str | None
    score: float | None
    threshold: float | None
    flagged: bool | None
    flagged_slices: SliceRange | None
    slices: list[SliceScoreOut]
    top_slices: list[TopSlice]
    worklist: WorklistEntry | None
    feedback: list[FeedbackOut]  # newest first
    feedback_allowed: bool  # routed (worklist or auto): a verdict on the auto contour can be recorded

    @classmethod
    def from_review(cls, review: SeriesReview, *, now: dt.datetime) -> SeriesDetail:
        series, score = review.series, review.score
        uid, version = series.series_instance_uid, series.version
        return cls(
            series_instance_uid=uid,
            version=version,
            latest_version=review.latest_version,
            state=series.state,
            route=series.route,
            route_reason=series.route_reason,
            gate=GateOut.from_detail(review.gate),
            modality=series.modality,
            num_instances=series.num_instances,
            completed_at=series.completed_at,
            patient_name=series.patient_name,
            patient_id=series.patient_id,
            study_date=series.study_date,
            series_description=series.series_description,
            geometry_findings=series.geometry_findings,
            model_version=score.model_version if score else None,
            score=score.score if score else None,
            threshold=score.threshold if score else None,
            flagged=score.flagged if score else None,
            flagged_slices=flagged_slice_range(score),
            slices=[
                SliceScoreOut(
                    index=s["index"],
                    sop_instance_uid=s.get("sop_instance_uid"),
                    position=s.get("position"),
                    score=s["score"],
                )
                for s in (score.slices if score else [])
            ],
            top_slices=[
                TopSlice(
                    index=t["index"],
                    score=t["score"],
                    sop_instance_uid=t.get("sop_instance_uid"),
                    has_residual_map=bool(t.get("residual_map")),
                    image_url=slice_image_url(uid, version, t["index"]),
                )
                for t in (score.top_slices if score else [])
            ],
            worklist=WorklistEntry.from_row(review.worklist, now=now) if review.worklist else None,
            feedback=[FeedbackOut.from_row(f, series_instance_uid=uid, version=version) for f in review.feedback],
            feedback_allowed=series.route is not None or review.worklist is not None,
        )


FeedbackVerdictIn = Literal["yes", "no", "not_applicable"]
#: The answer to a shadow review (service/shadow.py): is the auto contour acceptable?
ShadowReviewAnswerIn = Literal["yes", "no"]


class FeedbackIn(BaseModel):
    """A dosimetrist's verdict: would the auto contour of this series have been acceptable?"""

    verdict: FeedbackVerdictIn
    note: str | None = Field(default=None, max_length=MAX_FEEDBACK_NOTE_LENGTH)


class FeedbackOut(BaseModel):
    """One recorded verdict: who, when, what (`no`: the auto contour would have failed)."""

    id: int
    series_instance_uid: str
    series_version: int
    worklist_item_id: int | None
    verdict: str  # yes | no | not_applicable
    note: str | None
    user: str
    created_at: dt.datetime

    @classmethod
    def from_row(cls, row: FeedbackRow, *, series_instance_uid: str, version: int) -> FeedbackOut:
        f = row.feedback
        return cls(
            id=f.id,
            series_instance_uid=series_instance_uid,
            series_version=version,
            worklist_item_id=f.worklist_item_id,
            verdict=f.verdict,
            note=f.note,
            user=row.user_name,
            created_at=f.created_at,
        )


class AssignIn(BaseModel):
    """Whom to assign a worklist item to: a user name, or null to take the assignment away."""

    assignee: str | None


class AuditEntry(BaseModel):
    """One line of the audit trail: who did what, when, on which worklist item and series version."""

    id: int
    created_at: dt.datetime
    user: str | None
    action: str  # claim | release | done | assign | unassign | feedback
    worklist_item_id: int | None
    series_instance_uid: str | None
    series_version: int | None
    detail: dict[str, Any]

    @classmethod
    def from_row(cls, row: AuditRow) -> AuditEntry:
        e = row.event
        return cls(
            id=e.id,
            created_at=e.created_at,
            user=row.user_name,
            action=e.action,
            worklist_item_id=e.worklist_item_id,
            series_instance_uid=row.series_instance_uid,
            series_version=row.series_version,
            detail=e.detail or {},
        )


class UserOut(BaseModel):
    name: str
    role: str

    @classmethod
    def from_user(cls, user: User) -> UserOut:
        return cls(name=user.name, role=user.role)


class CheckResult(BaseModel):
    """One readiness check: `ok` or `failed`, why it failed, and what it found (the gate: its version and
    the population it was calibrated on)."""

    name: str
    status: str  # ok | failed
    reason: str | None = None
    detail: dict[str, Any] | None = None


class Readiness(BaseModel):
    status: str  # ok | failed: failed when any check failed
    checks: list[CheckResult]


def fired_findings(detail: dict[str, Any] | None) -> list[FindingOut]:
    """The fired findings of the gate's decision in a worklist item's detail; empty when it holds none."""
    gate = GateOut.from_detail(detail)
    return [f for f in gate.findings if f.fired] if gate is not None else []


def flagged_slice_range(score: SeriesScore | None) -> SliceRange | None:
    """The slices scoring above the series threshold, or None when none does (or nothing was scored)."""
    if score is None:
        return None
    above = [s["index"] for s in score.slices if s.get("score") is not None and s["score"] > score.threshold]
    if not above:
        return None
    return SliceRange(first=min(above), last=max(above), count=len(above))


def series_url(series_instance_uid: str, version: int) -> str:
    return f"/series/{quote(series_instance_uid)}?version={version}"


def slice_image_url(series_instance_uid: str, version: int, index: int) -> str:
    return f"/series/{quote(series_instance_uid)}/versions/{version}/slices/{index}.png"


def sort_entries(entries: list[WorklistEntry], *, key: str, descending: bool) -> list[WorklistEntry]:
    """`entries` sorted by one of SORT_KEYS; entries without a value for the key come last either way.

    Raises:
        ValueError: `key` is not one of SORT_KEYS.
    """
    getters: dict[str, Callable[[WorklistEntry], Any]] = {
        "age": lambda e: e.age_s,
        "patient": lambda e: (e.patient_name or "").casefold() or None,
        "study_date": lambda e: e.study_date,
        "description": lambda e: (e.series_description or "").casefold() or None,
        "reason": lambda e: e.reason,
        "score": lambda e: None if e.score is None or not e.threshold else e.score / e.threshold,
        "status": lambda e: (
            ("open", "claimed", "done", "contoured").index(e.status)
            if e.status in ("open", "claimed", "done", "contoured")
            else 4
        ),
        # Most informative first (`service.suggest.informativeness`): the gate's fused evidence ÷ threshold.
        "informative": lambda e: informativeness(detail=e.detail, score=e.score, threshold=e.threshold),
    }
    if key not in getters:
        raise ValueError(f"sort key {key!r}: expected one of {', '.join(SORT_KEYS)}")
    get = getters[key]
    present = [e for e in entries if get(e) is not None]
    missing = [e for e in entries if get(e) is None]
    return sorted(present, key=get, reverse=descending) + missing
