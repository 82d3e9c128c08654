"""The dosimetrists' worklist: server-rendered pages, a JSON API and health endpoints (FastAPI).

`create_app(settings, sessions=None)` builds the app once per process; routes stay thin and call
the keyword-only functions in `service.web.crud`. Every route needs a login except `/healthz`,
`/login` and the static files (style sheet only): pages take the session cookie set by
`POST /login`; the API (`/api/...`) and `/readyz` take the same cookie or HTTP basic auth.

Errors answer with a reason: 401 (API, no or wrong credentials) or a redirect to the login page,
400/422 bad parameters, 403 a cross-site form post, 404 unknown series/item/slice, 409 the
worklist item's state forbids the action, 503 from `/readyz` when a check failed.

Patient names and ids are shown to logged-in users only and are never logged; the access log
is off because URLs hold Series Instance UIDs.
"""

# No `from __future__ import annotations`: FastAPI must see the dependency types defined inside
# create_app at run time.
import base64
import binascii
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import Depends, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker

from service.db.session import make_engine, make_session_factory
from service.db.tables import User, WorklistStatus, utc_now
from service.settings import Settings
from service.web import crud, security
from service.web.health import readiness_checks
from service.web.images import ImageUnavailable, render_slice_png, resolve_stored, slice_score_svg
from service.web.schemas import (
    SORT_KEYS,
    Readiness,
    SeriesDetail,
    UserOut,
    WorklistEntry,
    sort_entries,
)

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent
SESSION_COOKIE = "gatekeeper_session"
ACTIVE_STATUSES = (WorklistStatus.OPEN.value, WorklistStatus.CLAIMED.value)
ALL_STATUSES = tuple(s.value for s in WorklistStatus)
BASIC_REALM = 'Basic realm="CT Gatekeeper", charset="UTF-8"'


class NotAuthenticated(Exception):
    """No valid session cookie or basic-auth credentials came with the request."""


class BadRequest(Exception):
    """A query or form parameter is not one of the accepted values; the message says which."""


class CrossSiteRequest(Exception):
    """A state-changing request came from another site's page (its Origin is not ours)."""


def create_app(settings: Settings, sessions: sessionmaker[Session] | None = None) -> FastAPI:
    """The worklist app for `settings`; `sessions` defaults to a factory on `settings.database_url`.

    Raises:
        service.web.security.InsecureSettings: no session secret outside development (see `session_secret`).
    """
    signer = security.SessionSigner(
        secret=security.session_secret(settings), max_age_s=settings.web_session_hours * 3600.0
    )
    if sessions is None:
        sessions = make_session_factory(make_engine(settings.database_url))
    templates = Jinja2Templates(directory=str(WEB_DIR / "templates"))
    templates.env.filters["age"] = format_age
    checks = readiness_checks(settings, sessions)

    app = FastAPI(title="CT Gatekeeper worklist", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.sessions = sessions
    app.mount("/static", StaticFiles(directory=str(WEB_DIR / "static")), name="static")

    # --- dependencies ---------------------------------------------------------------------------

    def db() -> Iterator[Session]:
        with sessions() as session:
            yield session

    def current_user(request: Request, session: Annotated[Session, Depends(db)]) -> User:
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            user_id = signer.user_id(cookie)
            user = crud.get_active_user(session=session, user_id=user_id) if user_id is not None else None
            if user is not None:
                return user
        credentials = basic_credentials(request.headers.get("authorization", ""))
        if credentials is not None:
            user = crud.authenticate(session=session, name=credentials[0], password=credentials[1])
            if user is not None:
                return user
        raise NotAuthenticated()

    def same_origin(request: Request) -> None:
        """Refuse a POST whose Origin is another site (a form on a foreign page, riding our cookie)."""
        origin = request.headers.get("origin")
        if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", ""):
            raise CrossSiteRequest(f"request from {origin} refused: not this site")

    DB = Annotated[Session, Depends(db)]
    CurrentUser = Annotated[User, Depends(current_user)]

    # --- errors -----------------------------------------------------------------------------------

    def error_response(
        request: Request, status_code: int, reason: str, headers: dict[str, str] | None = None
    ) -> Response:
        if wants_json(request):
            return JSONResponse({"detail": reason}, status_code=status_code, headers=headers)
        return templates.TemplateResponse(
            request, "error.html", {"status_code": status_code, "reason": reason, "user": None}, status_code=status_code
        )

    @app.exception_handler(NotAuthenticated)
    def _not_authenticated(request: Request, exc: NotAuthenticated) -> Response:
        if wants_json(request):
            return JSONResponse(
                {"detail": "login required: HTTP basic auth or the session cookie of POST /login"},
                status_code=401,
                headers={"WWW-Authenticate": BASIC_REALM},
            )
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    @app.exception_handler(crud.NotFound)
    def _not_found(request: Request, exc: crud.NotFound) -> Response:
        return error_response(request, 404, str(exc))

    @app.exception_handler(ImageUnavailable)
    def _image_unavailable(request: Request, exc: ImageUnavailable) -> Response:
        return error_response(request, 404, str(exc))

    @app.exception_handler(crud.Conflict)
    def _conflict(request: Request, exc: crud.Conflict) -> Response:
        return error_response(request, 409, str(exc))

    @app.exception_handler(BadRequest)
    def _bad_request(request: Request, exc: BadRequest) -> Response:
        return error_response(request, 400, str(exc))

    @app.exception_handler(CrossSiteRequest)
    def _cross_site(request: Request, exc: CrossSiteRequest) -> Response:
        return error_response(request, 403, str(exc))

    # --- health -----------------------------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers HTTP. Needs no login."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness)
    def readyz(user: CurrentUser) -> JSONResponse:
        """Readiness: database, broker, model files, disk; 503 naming the failed checks."""
        results = [check() for check in checks]
        failed = any(r.status != "ok" for r in results)
        body = Readiness(status="failed" if failed else "ok", checks=results)
        return JSONResponse(body.model_dump(), status_code=503 if failed else 200)

    # --- login ------------------------------------------------------------------------------------

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/worklist") -> Response:
        return templates.TemplateResponse(request, "login.html", {"next": safe_next(next), "error": None, "user": None})

    @app.post("/login")
    def login(
        request: Request,
        session: DB,
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

    @app.post("/logout")
    def logout(_: None = Depends(same_origin)) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # --- pages ------------------------------------------------------------------------------------

    @app.get("/")
    def home(user: CurrentUser) -> Response:
        return RedirectResponse("/worklist", status_code=303)

    @app.get("/worklist", response_class=HTMLResponse)
    def worklist_page(
        request: Request, user: CurrentUser, session: DB, sort: str = "age", order: str = "desc", status: str = "active"
    ) -> Response:
        entries = worklist_entries(session, sort=sort, order=order, status=status)
        return templates.TemplateResponse(
            request,
            "worklist.html",
            {"user": user, "entries": entries, "sort": sort, "order": order, "status": status, "sort_keys": SORT_KEYS},
        )

    @app.get("/series/{series_instance_uid}", response_class=HTMLResponse)
    def series_page(
        request: Request,
        series_instance_uid: str,
        user: CurrentUser,
        session: DB,
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

    @app.get("/series/{series_instance_uid}/versions/{version}/slices/{index}.png")
    def slice_image(series_instance_uid: str, version: int, index: int, user: CurrentUser, session: DB) -> Response:
        """The slice, and beside it the slice with the detector's residual heat map (top slices only)."""
        review = crud.get_series_review(session=session, series_instance_uid=series_instance_uid, version=version)
        source = crud.get_slice_source(session=session, series_id=review.series.id, index=index)
        dicom_path = resolve_stored(settings.storage_dir, source.instance_path)
        residual = resolve_stored(settings.storage_dir, source.residual_map_path) if source.residual_map_path else None
        png = render_slice_png(dicom_path=dicom_path, residual_path=residual)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    @app.post("/worklist/{item_id}/{action}")
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

    # --- JSON API ---------------------------------------------------------------------------------

    @app.get("/api/me", response_model=UserOut)
    def api_me(user: CurrentUser) -> UserOut:
        return UserOut.from_user(user)

    @app.get("/api/worklist", response_model=list[WorklistEntry])
    def api_worklist(
        user: CurrentUser, session: DB, sort: str = "age", order: str = "desc", status: str = "active"
    ) -> list[WorklistEntry]:
        """Worklist entries; `status`: active (open and claimed, default), all, or a comma-separated list."""
        return worklist_entries(session, sort=sort, order=order, status=status)

    @app.post("/api/worklist/{item_id}/{action}", response_model=WorklistEntry)
    def api_worklist_action(
        item_id: int, action: str, user: CurrentUser, session: DB, _: None = Depends(same_origin)
    ) -> WorklistEntry:
        """`action`: claim, release or done; answers the item as it is afterwards."""
        row = apply_action(session, item_id=item_id, action=action, user=user)
        return WorklistEntry.from_row(row, now=utc_now())

    @app.get("/api/series/{series_instance_uid}", response_model=SeriesDetail)
    def api_series(
        series_instance_uid: str, user: CurrentUser, session: DB, version: Annotated[int | None, Query(ge=1)] = None
    ) -> SeriesDetail:
        """One series version (default: the newest) with its route, state, scores and worklist item."""
        return series_detail(session, series_instance_uid, version)

    return app


# --- helpers the routes share (no HTTP in here) -----------------------------------------------------

ACTIONS = {"claim": crud.claim_item, "release": crud.release_item, "done": crud.finish_item}


def apply_action(session: Session, *, item_id: int, action: str, user: User) -> crud.WorklistRow:
    """Run one worklist action for `user`.

    Raises:
        BadRequest: `action` is not claim, release or done.
        crud.NotFound, crud.Conflict: see `crud.claim_item` and the others.
    """
    if action not in ACTIONS:
        raise BadRequest(f"unknown worklist action {action!r}; expected one of {', '.join(ACTIONS)}")
    return ACTIONS[action](session=session, item_id=item_id, user_id=user.id)


def worklist_entries(session: Session, *, sort: str, order: str, status: str) -> list[WorklistEntry]:
    """The worklist as shown: filtered by `status`, sorted by `sort` in `order` (asc|desc).

    Raises:
        BadRequest: an unknown sort key, order or status.
    """
    if order not in ("asc", "desc"):
        raise BadRequest(f"order {order!r}: expected asc or desc")
    if status == "active":
        statuses: tuple[str, ...] = ACTIVE_STATUSES
    elif status == "all":
        statuses = ALL_STATUSES
    else:
        statuses = tuple(s.strip() for s in status.split(",") if s.strip())
        unknown = [s for s in statuses if s not in ALL_STATUSES]
        if unknown or not statuses:
            raise BadRequest(f"status {status!r}: expected active, all, or a list of {', '.join(ALL_STATUSES)}")
    now = utc_now()
    entries = [WorklistEntry.from_row(row, now=now) for row in crud.list_worklist(session=session, statuses=statuses)]
    try:
        return sort_entries(entries, key=sort, descending=order == "desc")
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def series_detail(session: Session, series_instance_uid: str, version: int | None) -> SeriesDetail:
    review = crud.get_series_review(session=session, series_instance_uid=series_instance_uid, version=version)
    return SeriesDetail.from_review(review, now=utc_now())


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(user name, password) from an `Authorization: Basic ...` header, or None when there is none or it is malformed."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, sep, password = decoded.partition(":")
    return (name, password) if sep else None


def wants_json(request: Request) -> bool:
    """True for the API and `/readyz`, which answer JSON; pages answer HTML."""
    return request.url.path.startswith("/api/") or request.url.path == "/readyz"


def safe_next(target: str) -> str:
    """`target` if it is a path on this site, else the worklist (no redirect to another site)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/worklist"
    return target


def format_age(seconds: float) -> str:
    """A short human duration: `45 s`, `12 min`, `3 h 05 min`, `2 d 4 h`."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} h {minutes % 60:02d} min"
    return f"{hours // 24} d {hours % 24} h"
