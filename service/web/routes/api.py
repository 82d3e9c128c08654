"""The JSON API under `/api`: who am I, the worklist and its actions, one series. HTTP basic auth or the cookie."""

# No `from __future__ import annotations`: FastAPI reads the dependency types at run time.
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from service.db.tables import utc_now
from service.web.deps import DB, CurrentUser, apply_action, same_origin, series_detail, worklist_entries
from service.web.schemas import SeriesDetail, UserOut, WorklistEntry

router = APIRouter(prefix="/api")


@router.get("/me", response_model=UserOut)
def api_me(user: CurrentUser) -> UserOut:
    return UserOut.from_user(user)


@router.get("/worklist", response_model=list[WorklistEntry])
def api_worklist(
    user: CurrentUser, session: DB, sort: str = "age", order: str = "desc", status: str = "active"
) -> list[WorklistEntry]:
    """Worklist entries; `status`: active (open and claimed, default), all, or a comma-separated list."""
    return worklist_entries(session, sort=sort, order=order, status=status)


@router.post("/worklist/{item_id}/{action}", response_model=WorklistEntry)
def api_worklist_action(
    item_id: int, action: str, user: CurrentUser, session: DB, _: None = Depends(same_origin)
) -> WorklistEntry:
    """`action`: claim, release or done; answers the item as it is afterwards."""
    row = apply_action(session, item_id=item_id, action=action, user=user)
    return WorklistEntry.from_row(row, now=utc_now())


@router.get("/series/{series_instance_uid}", response_model=SeriesDetail)
def api_series(
    series_instance_uid: str, user: CurrentUser, session: DB, version: Annotated[int | None, Query(ge=1)] = None
) -> SeriesDetail:
    """One series version (default: the newest) with its route, state, scores and worklist item."""
    return series_detail(session, series_instance_uid, version)
