"""The HTML pages: login and logout, the worklist, a series with its score plot, slice images, worklist forms."""

# No `from __future__ import annotations`: FastAPI reads the dependency types at run time.
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from service.web import crud
from service.web.deps import (
    DB,
    SESSION_COOKIE,
    AppSettings,
    CurrentUser,
    Signer,
    Templates,
    apply_action,
    safe_next,
    same_origin,
    series_detail,
    worklist_entries,
)
from service.web.images import render_slice_png, resolve_stored, slice_score_svg
from service.web.schemas import SORT_KEYS

log = logging.getLogger(__name__)

router = APIRouter()

# --- login ------------------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, templates: Templates, next: str = "/worklist") -> Response:
    return templates.TemplateResponse(request, "login.html", {"next": safe_next(next), "error": None, "user": None})


@router.post("/login")
def login(
    request: Request,
    session: DB,
    settings: AppSettings,
    signer: Signer,
    templates: Templates,
    name: Annotated[str, Form()],
    password: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/worklist",
    _: None = Depends(same_origin),
) -> Response:
    user = crud.authenticate(session=session, name=name, password=password)
    if user is None:
        log.info("login refused")
        return templates.TemplateResponse(
            request,
            "login.html",
            {
                "next": safe_next(next),
                "error": "Wrong user name or password, or the user is disabled.",
                "user": None,
            },
            status_code=401,
        )
    log.info("user %s logged in", user.id)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        signer.sign(user.id),
        max_age=int(signer.max_age_s),
        httponly=True,
        samesite="lax",
        secure=settings.web_cookie_secure,
        path="/",
    )
    return response


@router.post("/logout")
def logout(_: None = Depends(same_origin)) -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# --- pages ------------------------------------------------------------------------------------------


@router.get("/")
def home(user: CurrentUser) -> Response:
    return RedirectResponse("/worklist", status_code=303)


@router.get("/worklist", response_class=HTMLResponse)
def worklist_page(
    request: Request,
    user: CurrentUser,
    session: DB,
    templates: Templates,
    sort: str = "age",
    order: str = "desc",
    status: str = "active",
) -> Response:
    entries = worklist_entries(session, sort=sort, order=order, status=status)
    return templates.TemplateResponse(
        request,
        "worklist.html",
        {"user": user, "entries": entries, "sort": sort, "order": order, "status": status, "sort_keys": SORT_KEYS},
    )


@router.get("/series/{series_instance_uid}", response_class=HTMLResponse)
def series_page(
    request: Request,
    series_instance_uid: str,
    user: CurrentUser,
    session: DB,
    templates: Templates,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    detail = series_detail(session, series_instance_uid, version)
    plot = (
        slice_score_svg(
            [s.model_dump() for s in detail.slices],
            threshold=detail.threshold,
            top_indexes=[t.index for t in detail.top_slices],
        )
        if detail.threshold is not None
        else None
    )
    return templates.TemplateResponse(request, "series.html", {"user": user, "s": detail, "plot": plot})


@router.get("/series/{series_instance_uid}/versions/{version}/slices/{index}.png")
def slice_image(
    series_instance_uid: str, version: int, index: int, user: CurrentUser, session: DB, settings: AppSettings
) -> Response:
    """The slice, and beside it the slice with the detector's residual heat map (top slices only)."""
    review = crud.get_series_review(session=session, series_instance_uid=series_instance_uid, version=version)
    source = crud.get_slice_source(session=session, series_id=review.series.id, index=index)
    dicom_path = resolve_stored(settings.storage_dir, source.instance_path)
    residual = resolve_stored(settings.storage_dir, source.residual_map_path) if source.residual_map_path else None
    png = render_slice_png(dicom_path=dicom_path, residual_path=residual)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@router.post("/worklist/{item_id}/{action}")
def worklist_action_form(
    item_id: int,
    action: str,
    user: CurrentUser,
    session: DB,
    next: Annotated[str, Form()] = "/worklist",
    _: None = Depends(same_origin),
) -> Response:
    apply_action(session, item_id=item_id, action=action, user=user)
    return RedirectResponse(safe_next(next), status_code=303)
