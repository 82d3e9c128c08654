"""What the worklist's routers share: dependencies, error types and their handlers, small helpers.

Everything a request needs was built once by `service.web.app.create_app` and lives on
`app.state`: `settings`, `sessions` (the session factory), `signer` (the session cookie's),
`templates` and `readiness_checks`. The dependencies below hand them to the routes.

Errors answer with a reason: `NotAuthenticated` is a 401 with a basic-auth challenge (API,
`/readyz`) or a redirect to the login page; `BadRequest` 400; `CrossSiteRequest` and
`crud.Forbidden` (the user's role does not allow it) 403;
`crud.NotFound` and `ImageUnavailable` 404; `crud.Conflict` 409. JSON for the API and `/readyz`,
the error page otherwise.
"""

# No `from __future__ import annotations`: FastAPI reads the dependency types (`DB`, `CurrentUser`, ...)
# at run time.
import base64
import binascii
import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from service.db.tables import RouteReason, User, WorklistStatus, utc_now
from service.settings import Settings
from service.web import crud, security
from service.web.health import Check
from service.web.images import ImageUnavailable
from service.web.schemas import SeriesDetail, WorklistEntry, sort_entries

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent
SESSION_COOKIE = "gatekeeper_session"
ACTIVE_STATUSES = (WorklistStatus.OPEN.value, WorklistStatus.CLAIMED.value)
ALL_STATUSES = tuple(s.value for s in WorklistStatus)
ALL_REASONS = tuple(r.value for r in RouteReason)
BASIC_REALM = 'Basic realm="CT Gatekeeper", charset="UTF-8"'


class NotAuthenticated(Exception):
    """No valid session cookie or basic-auth credentials came with the request."""


class BadRequest(Exception):
    """A query or form parameter is not one of the accepted values; the message says which."""


class CrossSiteRequest(Exception):
    """A state-changing request came from another site's page (its Origin is not ours)."""


# --- dependencies -----------------------------------------------------------------------------------


def db(request: Request) -> Iterator[Session]:
    """A database session for this request, from the app's session factory."""
    with request.app.state.sessions() as session:
        yield session


def app_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def session_signer(request: Request) -> security.SessionSigner:
    return request.app.state.signer  # type: ignore[no-any-return]


def app_templates(request: Request) -> Jinja2Templates:
    return request.app.state.templates  # type: ignore[no-any-return]


def app_readiness_checks(request: Request) -> list[Check]:
    return request.app.state.readiness_checks  # type: ignore[no-any-return]


DB = Annotated[Session, Depends(db)]
AppSettings = Annotated[Settings, Depends(app_settings)]
Signer = Annotated[security.SessionSigner, Depends(session_signer)]
Templates = Annotated[Jinja2Templates, Depends(app_templates)]
ReadinessChecks = Annotated[list[Check], Depends(app_readiness_checks)]


def current_user(request: Request, session: DB, signer: Signer) -> User:
    """The logged-in user: from the session cookie, else from HTTP basic auth.

    Raises:
        NotAuthenticated: neither names an active user.
    """
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


CurrentUser = Annotated[User, Depends(current_user)]


def same_origin(request: Request) -> None:
    """Refuse a POST whose Origin is another site (a form on a foreign page, riding our cookie).

    Raises:
        CrossSiteRequest: the Origin header names another host.
    """
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise CrossSiteRequest(f"request from {origin} refused: not this site")


# --- error handlers (registered by create_app) ------------------------------------------------------


def error_response(request: Request, status_code: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    """`{"detail": reason}` for the API and `/readyz`, the error page otherwise."""
    if wants_json(request):
        return JSONResponse({"detail": reason}, status_code=status_code, headers=headers)
    return app_templates(request).TemplateResponse(
        request, "error.html", {"status_code": status_code, "reason": reason, "user": None}, status_code=status_code
    )


def not_authenticated(request: Request, exc: Exception) -> Response:
    """401 with a basic-auth challenge for the API and `/readyz`; pages redirect to the login page."""
    if wants_json(request):
        return JSONResponse(
            {"detail": "login required: HTTP basic auth or the session cookie of POST /login"},
            status_code=401,
            headers={"WWW-Authenticate": BASIC_REALM},
        )
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)


def not_found(request: Request, exc: Exception) -> Response:
    """404 for `crud.NotFound` (unknown series, item or slice) and `ImageUnavailable`."""
    return error_response(request, 404, str(exc))


def conflict(request: Request, exc: Exception) -> Response:
    """409 for `crud.Conflict`: the worklist item's state forbids the action."""
    return error_response(request, 409, str(exc))


def bad_request(request: Request, exc: Exception) -> Response:
    return error_response(request, 400, str(exc))


def cross_site(request: Request, exc: Exception) -> Response:
    return error_response(request, 403, str(exc))


def forbidden(request: Request, exc: Exception) -> Response:
    """403 for `crud.Forbidden`: the user's role does not allow the action."""
    return error_response(request, 403, str(exc))


#: Exception type → handler, in the order create_app registers them.
ERROR_HANDLERS = (
    (NotAuthenticated, not_authenticated),
    (crud.NotFound, not_found),
    (ImageUnavailable, not_found),
    (crud.Conflict, conflict),
    (BadRequest, bad_request),
    (CrossSiteRequest, cross_site),
    (crud.Forbidden, forbidden),
)


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


def worklist_entries(
    session: Session,
    *,
    sort: str,
    order: str,
    status: str,
    reason: str = "",
    older_than_h: float | None = None,
    user: User | None = None,
) -> list[WorklistEntry]:
    """The worklist as shown: filtered by `status`, `reason` and age, sorted by `sort` in `order` (asc|desc).

    `reason`: empty for any, else a comma-separated list of `RouteReason` values; `older_than_h`:
    only items on the worklist for more than this many hours. With `user`, the items they claimed
    or were assigned come first (each group in the requested order).

    Raises:
        BadRequest: an unknown sort key, order, status or reason, or a negative age.
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
    reasons = tuple(r.strip() for r in reason.split(",") if r.strip())
    if any(r not in ALL_REASONS for r in reasons):
        raise BadRequest(f"reason {reason!r}: expected empty (any) or a list of {', '.join(ALL_REASONS)}")
    if older_than_h is not None and not older_than_h >= 0:
        raise BadRequest(f"older_than_h {older_than_h!r}: expected a number of hours, 0 or more")
    now = utc_now()
    rows = crud.list_worklist(
        session=session,
        statuses=statuses,
        reasons=reasons or None,
        created_before=now - dt.timedelta(hours=older_than_h) if older_than_h is not None else None,
    )
    entries = [WorklistEntry.from_row(row, now=now) for row in rows]
    try:
        entries = sort_entries(entries, key=sort, descending=order == "desc")
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if user is None:
        return entries
    mine: list[WorklistEntry] = []
    others: list[WorklistEntry] = []
    for entry in entries:
        is_mine = user.name in (entry.claimed_by, entry.assigned_to) and entry.status not in (
            WorklistStatus.DONE,
            WorklistStatus.CONTOURED,
        )
        (mine if is_mine else others).append(entry)
    return mine + others


def series_detail(session: Session, series_instance_uid: str, version: int | None) -> SeriesDetail:
    """One series version (the newest when `version` is None) as the page and the API show it.

    Raises:
        crud.NotFound: no such series or version.
    """
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
