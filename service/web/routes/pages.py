"""The HTML pages: login and logout, the worklist (filters, assignment), a series with its score plot, slice
images and contour feedback, worklist forms, the admins' audit trail."""

# No `from __future__ import annotations`: FastAPI reads the dependency types at run time.
import logging
import math
from typing import Annotated
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from service.calibration_population import read_active_gate
from service.db.tables import MAX_FEEDBACK_NOTE_LENGTH, UserRole
from service.web import crud
from service.web.deps import (
    ALL_REASONS,
    DB,
    MAX_ID,
    AppSettings,
    BadRequest,
    CurrentUser,
    ItemId,
    Signer,
    SliceIndex,
    Templates,
    Throttle,
    TooManyAttempts,
    Version,
    apply_action,
    check_password,
    csrf_form,
    safe_next,
    series_detail,
    worklist_entries,
)
from service.web.images import render_slice_png, resolve_stored, slice_score_svg
from service.web.protection import SESSION_COOKIE
from service.web.schemas import SORT_KEYS, AuditEntry, FeedbackVerdictIn, ShadowReviewAnswerIn

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
    throttle: Throttle,
    name: Annotated[str, Form(max_length=256)],
    password: Annotated[str, Form(max_length=1024)],
    next: Annotated[str, Form()] = "/worklist",
    _: None = Depends(csrf_form),
) -> Response:
    """Check the password (throttled: 429 after repeated failures); on success set the session cookie."""
    try:
        user = check_password(request, session, throttle, name=name, password=password)
    except TooManyAttempts as exc:
        return templates.TemplateResponse(
            request,
            "login.html",
            {"next": safe_next(next), "error": f"Too many failed logins: {exc}.", "user": None},
            status_code=429,
            headers={"Retry-After": str(math.ceil(exc.retry_after_s))},
        )
    if user is None:
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
        signer.sign(user.id, user.session_generation),
        max_age=int(signer.max_age_s),
        httponly=True,
        samesite="lax",
        secure=settings.web_cookie_secure,
        path="/",
    )
    return response


@router.post("/logout")
def logout(request: Request, session: DB, signer: Signer, _: None = Depends(csrf_form)) -> Response:
    """End the session: this cookie and every copy of it (the user's other sessions too)."""
    cookie = request.cookies.get(SESSION_COOKIE)
    claims = signer.read(cookie) if cookie else None
    if claims is not None and crud.get_session_user(
        session=session, user_id=claims.user_id, generation=claims.generation
    ):
        crud.end_sessions(session=session, user_id=claims.user_id)
        log.info("user %s logged out", claims.user_id)
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
    settings: AppSettings,
    templates: Templates,
    sort: str = "age",
    order: str = "desc",
    status: str = "active",
    reason: str = "",
    older_than_h: str = "",
) -> Response:
    """The worklist; the filter form sends `status`, `reason` and `older_than_h` (empty: no age filter)."""
    try:
        min_age_h = float(older_than_h) if older_than_h.strip() else None
    except ValueError:  # inf and nan parse; worklist_entries refuses them
        raise BadRequest(f"older_than_h {older_than_h!r}: expected a number of hours") from None
    entries = worklist_entries(
        session, sort=sort, order=order, status=status, reason=reason, older_than_h=min_age_h, user=user
    )
    # What the sort and filter links keep of the current view.
    filters = urlencode({"status": status, "reason": reason, "older_than_h": older_than_h})
    assignees = [u.name for u in crud.list_users(session=session) if u.active] if user.role == UserRole.ADMIN else []
    return templates.TemplateResponse(
        request,
        "worklist.html",
        {
            "user": user,
            "entries": entries,
            "sort": sort,
            "order": order,
            "status": status,
            "reason": reason,
            "older_than_h": older_than_h,
            "filters": filters,
            "reasons": ALL_REASONS,
            "sort_keys": SORT_KEYS,
            "age_warning_s": settings.worklist_age_warning_h * 3600.0,
            "age_warning_h": settings.worklist_age_warning_h,
            "assignees": assignees,
            "gate": read_active_gate(session=session, settings=settings),
        },
    )


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, user: CurrentUser, session: DB, templates: Templates) -> Response:
    """Who did what when in the worklist app (admins only: 403 otherwise)."""
    entries = [AuditEntry.from_row(row) for row in crud.list_audit(session=session, viewer_id=user.id)]
    return templates.TemplateResponse(request, "audit.html", {"user": user, "entries": entries})


@router.get("/series/{series_instance_uid}", response_class=HTMLResponse)
def series_page(
    request: Request,
    series_instance_uid: str,
    user: CurrentUser,
    session: DB,
    templates: Templates,
    version: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
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
    series_instance_uid: str,
    version: Version,
    index: SliceIndex,
    user: CurrentUser,
    session: DB,
    settings: AppSettings,
) -> Response:
    """The slice, and beside it the slice with the detector's residual heat map (top slices only)."""
    review = crud.get_series_review(session=session, series_instance_uid=series_instance_uid, version=version)
    source = crud.get_slice_source(session=session, series_id=review.series.id, index=index)
    dicom_path = resolve_stored(settings.storage_dir, source.instance_path)
    residual = resolve_stored(settings.storage_dir, source.residual_map_path) if source.residual_map_path else None
    png = render_slice_png(dicom_path=dicom_path, residual_path=residual)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@router.post("/worklist/{item_id}/assign")
def worklist_assign_form(
    item_id: ItemId,
    user: CurrentUser,
    session: DB,
    assignee: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/worklist",
    _: None = Depends(csrf_form),
) -> Response:
    """Assign the item to `assignee` (empty: take the assignment away); admins only (403 otherwise)."""
    crud.assign_item(session=session, item_id=item_id, admin_id=user.id, assignee_name=assignee.strip() or None)
    return RedirectResponse(safe_next(next), status_code=303)


@router.post("/series/{series_instance_uid}/feedback")
def series_feedback_form(
    series_instance_uid: str,
    user: CurrentUser,
    session: DB,
    verdict: Annotated[FeedbackVerdictIn, Form()],
    version: Annotated[int, Form(ge=1, le=MAX_ID)],
    note: Annotated[str, Form(max_length=MAX_FEEDBACK_NOTE_LENGTH)] = "",
    _: None = Depends(csrf_form),
) -> Response:
    """Record the user's verdict on the auto contour of this series version; back to the series page."""
    review = crud.get_series_review(session=session, series_instance_uid=series_instance_uid, version=version)
    crud.record_feedback(session=session, series_id=review.series.id, user_id=user.id, verdict=verdict, note=note)
    return RedirectResponse(f"/series/{quote(series_instance_uid)}?version={version}#feedback", status_code=303)


@router.post("/worklist/{item_id}/shadow-review")
def shadow_review_form(
    item_id: ItemId,
    user: CurrentUser,
    session: DB,
    verdict: Annotated[ShadowReviewAnswerIn, Form()],
    next: Annotated[str, Form()] = "/worklist",
    _: None = Depends(csrf_form),
) -> Response:
    """Answer a shadow review (is the auto contour acceptable? yes / no); it is then done. Before the
    claim/release/done route, which would take "shadow-review" for an action."""
    crud.answer_shadow_review(session=session, item_id=item_id, user_id=user.id, verdict=verdict)
    return RedirectResponse(safe_next(next), status_code=303)


@router.post("/worklist/{item_id}/{action}")
def worklist_action_form(
    item_id: ItemId,
    action: str,
    user: CurrentUser,
    session: DB,
    next: Annotated[str, Form()] = "/worklist",
    _: None = Depends(csrf_form),
) -> Response:
    apply_action(session, item_id=item_id, action=action, user=user)
    return RedirectResponse(safe_next(next), status_code=303)
