"""The JSON API under `/api`: who am I, the worklist (filters, actions, assignment), one series and its
contour feedback, the audit trail (admins). HTTP basic auth or the cookie; a state-changing call sends
`Origin` (see `service.web.protection`), and with the cookie also the `X-CSRF-Token` header."""

# No `from __future__ import annotations`: FastAPI reads the dependency types at run time.
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from service.db.tables import utc_now
from service.web import crud
from service.web.deps import (
    DB,
    MAX_AGE_H,
    MAX_ID,
    CurrentUser,
    ItemId,
    apply_action,
    csrf_api,
    series_detail,
    worklist_entries,
)
from service.web.schemas import (
    AssignIn,
    AuditEntry,
    FeedbackIn,
    FeedbackOut,
    SeriesDetail,
    UserOut,
    WorklistEntry,
)

router = APIRouter(prefix="/api")


@router.get("/me", response_model=UserOut)
def api_me(user: CurrentUser) -> UserOut:
    return UserOut.from_user(user)


@router.get("/worklist", response_model=list[WorklistEntry])
def api_worklist(
    user: CurrentUser,
    session: DB,
    sort: str = "age",
    order: str = "desc",
    status: str = "active",
    reason: str = "",
    older_than_h: Annotated[float | None, Query(ge=0, le=MAX_AGE_H, allow_inf_nan=False)] = None,
) -> list[WorklistEntry]:
    """Worklist entries; `status`: active (open and claimed, default), all, or a comma-separated list;
    `reason`: a comma-separated list of reasons (default: any); `older_than_h`: only items on the
    worklist for longer. Items the caller claimed or was assigned come first."""
    return worklist_entries(
        session, sort=sort, order=order, status=status, reason=reason, older_than_h=older_than_h, user=user
    )


@router.post("/worklist/{item_id}/assign", response_model=WorklistEntry)
def api_worklist_assign(
    item_id: ItemId, body: AssignIn, user: CurrentUser, session: DB, _: None = Depends(csrf_api)
) -> WorklistEntry:
    """Assign the item to `assignee` (null: take the assignment away); admins only (403 otherwise)."""
    row = crud.assign_item(session=session, item_id=item_id, admin_id=user.id, assignee_name=body.assignee)
    return WorklistEntry.from_row(row, now=utc_now())


@router.post("/worklist/{item_id}/{action}", response_model=WorklistEntry)
def api_worklist_action(
    item_id: ItemId, action: str, user: CurrentUser, session: DB, _: None = Depends(csrf_api)
) -> WorklistEntry:
    """`action`: claim, release or done; answers the item as it is afterwards."""
    row = apply_action(session, item_id=item_id, action=action, user=user)
    return WorklistEntry.from_row(row, now=utc_now())


@router.get("/series/{series_instance_uid}", response_model=SeriesDetail)
def api_series(
    series_instance_uid: str,
    user: CurrentUser,
    session: DB,
    version: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> SeriesDetail:
    """One series version (default: the newest) with its route, state, scores, worklist item and feedback."""
    return series_detail(session, series_instance_uid, version)


@router.post("/series/{series_instance_uid}/feedback", response_model=FeedbackOut, status_code=201)
def api_series_feedback(
    series_instance_uid: str,
    body: FeedbackIn,
    user: CurrentUser,
    session: DB,
    version: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    _: None = Depends(csrf_api),
) -> FeedbackOut:
    """Record the caller's verdict on the auto contour of the series version (default: the newest):
    yes / no / not_applicable and an optional note. The series' state does not change."""
    review = crud.get_series_review(session=session, series_instance_uid=series_instance_uid, version=version)
    row = crud.record_feedback(
        session=session, series_id=review.series.id, user_id=user.id, verdict=body.verdict, note=body.note
    )
    return FeedbackOut.from_row(row, series_instance_uid=series_instance_uid, version=review.series.version)


@router.get("/audit", response_model=list[AuditEntry])
def api_audit(user: CurrentUser, session: DB, limit: Annotated[int, Query(ge=1, le=10_000)] = 500) -> list[AuditEntry]:
    """The newest audit lines, newest first: who did what when (admins only: 403 otherwise)."""
    return [AuditEntry.from_row(row) for row in crud.list_audit(session=session, viewer_id=user.id, limit=limit)]
