"""What the worklist's routers share: dependencies, error types and their handlers, small helpers.

Everything a request needs was built once by `service.web.app.create_app` and lives on
`app.state`: `settings`, `sessions` (the session factory), `signer` (the session cookie's),
`templates` and `readiness_checks`. The dependencies below hand them to the routes.

Errors answer with a reason: `NotAuthenticated` is a 401 (API, `/readyz`; never with a
`WWW-Authenticate` challenge, so a browser never offers to remember basic-auth credentials) or a
redirect to the login page; `BadRequest` 400; `CrossSiteRequest` (a form without its CSRF token) and
`crud.Forbidden` (the user's role does not allow it) 403; `TooManyAttempts` 429 with Retry-After;
`crud.NotFound` and `ImageUnavailable` 404; `crud.Conflict` 409. JSON for the API and `/readyz`,
the error page otherwise.
"""

# No `from __future__ import annotations`: FastAPI reads the dependency types (`DB`, `CurrentUser`, ...)
# at run time.
import base64
import binascii
import datetime as dt
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from service.db.tables import RouteReason, User, WorklistStatus, utc_now
from service.settings import Settings
from service.web import crud, security
from service.web.health import Check
from service.web.images import ImageUnavailable
from service.web.protection import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE
from service.web.schemas import SeriesDetail, WorklistEntry, sort_entries

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent
ACTIVE_STATUSES = (WorklistStatus.OPEN.value, WorklistStatus.CLAIMED.value)
ALL_STATUSES = tuple(s.value for s in WorklistStatus)
ALL_REASONS = tuple(r.value for r in RouteReason)
#: A session cookie is re-issued (its idle clock restarted) at most this often, in seconds.
SESSION_REFRESH_S = 60
#: Largest id, version or slice index a path or query accepts (PostgreSQL INTEGER); larger: 422.
MAX_ID = 2**31 - 1
#: Largest `older_than_h` filter, in hours (about 114 years; more would overflow the date).
MAX_AGE_H = 1_000_000


class NotAuthenticated(Exception):
    """No valid session cookie or basic-auth credentials came with the request."""


class BadRequest(Exception):
    """A query or form parameter is not one of the accepted values; the message says which."""


class CrossSiteRequest(Exception):
    """A state-changing request without the CSRF token of this browser (a form on another site's page)."""


class TooManyAttempts(Exception):
    """Too many failed logins for this user name or from this address; `retry_after_s` until the next try."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"too many failed logins: try again in {math.ceil(retry_after_s)} s")
        self.retry_after_s = retry_after_s


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


def login_throttle(request: Request) -> security.LoginThrottle:
    return request.app.state.login_throttle  # type: ignore[no-any-return]


DB = Annotated[Session, Depends(db)]
AppSettings = Annotated[Settings, Depends(app_settings)]
Signer = Annotated[security.SessionSigner, Depends(session_signer)]
Templates = Annotated[Jinja2Templates, Depends(app_templates)]
ReadinessChecks = Annotated[list[Check], Depends(app_readiness_checks)]
Throttle = Annotated[security.LoginThrottle, Depends(login_throttle)]
# Numbers in paths, bounded so that a huge one is a 422, not a database error.
ItemId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
Version = Annotated[int, PathParam(ge=1, le=MAX_ID)]
SliceIndex = Annotated[int, PathParam(ge=-MAX_ID, le=MAX_ID)]  # -1: 404, "the series has no slice -1"


def current_user(request: Request, session: DB, signer: Signer, throttle: Throttle) -> User:
    """The logged-in user: from the session cookie, else (under `/api/` only) from HTTP basic auth.

    A cookie opens a session while it is signed, young and recently used enough (see
    `security.SessionSigner`) and its generation is the user's; one older than `SESSION_REFRESH_S`
    is re-issued with the idle clock restarted (the middleware sets it on the answer).
    `request.state.auth` says which one it was: "cookie" or "basic".

    Raises:
        NotAuthenticated: neither names an active user.
        TooManyAttempts: basic auth while its user name or the client address is throttled.
    """
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        now = time.time()
        claims = signer.read(cookie, now=now)
        if claims is not None:
            user = crud.get_session_user(session=session, user_id=claims.user_id, generation=claims.generation)
            if user is not None:
                request.state.auth = "cookie"
                if now - claims.seen_at >= SESSION_REFRESH_S:
                    value = signer.sign(user.id, claims.generation, issued_at=claims.issued_at, now=now)
                    remaining = int(signer.max_age_s - (now - claims.issued_at))
                    request.state.session_cookie = (value, max(remaining, 1))
                return user
    if request.url.path.startswith("/api/"):
        credentials = basic_credentials(request.headers.get("authorization", ""))
        if credentials is not None:
            user = check_password(request, session, throttle, name=credentials[0], password=credentials[1])
            if user is not None:
                request.state.auth = "basic"
                return user
    raise NotAuthenticated()


CurrentUser = Annotated[User, Depends(current_user)]


def check_password(
    request: Request, session: Session, throttle: security.LoginThrottle, *, name: str, password: str
) -> User | None:
    """The active user with this name and password, or None; the login form and basic auth both come here.

    Each try counts against the user name and the client address (`security.LoginThrottle`); a
    failure is logged with both (never the password).

    Raises:
        TooManyAttempts: the name or the address is locked out for now (nothing was checked).
    """
    address = client_address(request)
    wait = throttle.attempt(name=name, address=address)
    if wait > 0:
        log.warning("login of user name %r from %s refused: locked out for %.0f s more", name[:64], address, wait)
        raise TooManyAttempts(wait)
    user = crud.authenticate(session=session, name=name, password=password)
    if user is None:
        log.warning("login failed: user name %r from %s (wrong password, unknown or disabled user)", name[:64], address)
        return None
    throttle.succeeded(name=name, address=address)
    return user


def client_address(request: Request) -> str:
    """The peer's IP address (behind a reverse proxy: the proxy's)."""
    return request.client.host if request.client else "unknown"


async def csrf_form(request: Request, signer: Signer) -> None:
    """Refuse a form post without this browser's CSRF token (`csrf_token` field, see `protection`).

    Raises:
        CrossSiteRequest: the token is missing or does not belong to the browser's CSRF cookie.
    """
    form = await request.form()
    token = form.get("csrf_token")
    if not signer.csrf_matches(request.cookies.get(CSRF_COOKIE), token if isinstance(token, str) else None):
        raise CrossSiteRequest("the form's CSRF token is missing or stale: reload the page and send it again")


def csrf_api(request: Request, user: CurrentUser, signer: Signer) -> None:
    """Refuse a state-changing API call made with the session cookie but without the `X-CSRF-Token`
    header (basic auth needs none: a browser never sends it unasked, see `not_authenticated`).

    Raises:
        CrossSiteRequest: cookie-authenticated and the header is missing or wrong.
    """
    if request.state.auth == "cookie" and not signer.csrf_matches(
        request.cookies.get(CSRF_COOKIE), request.headers.get(CSRF_HEADER)
    ):
        raise CrossSiteRequest(f"with the session cookie, send the {CSRF_HEADER} header of this browser")


# --- error handlers (registered by create_app) ------------------------------------------------------


def error_response(request: Request, status_code: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    """`{"detail": reason}` for the API and `/readyz`, the error page otherwise."""
    if wants_json(request):
        return JSONResponse({"detail": reason}, status_code=status_code, headers=headers)
    return app_templates(request).TemplateResponse(
        request,
        "error.html",
        {"status_code": status_code, "reason": reason, "user": None},
        status_code=status_code,
        headers=headers,
    )


def not_authenticated(request: Request, exc: Exception) -> Response:
    """401 for the API and `/readyz`, without a `WWW-Authenticate` challenge (a browser would offer to
    remember the credentials and then send them with any site's request); pages redirect to the login page."""
    if wants_json(request):
        return JSONResponse(
            {"detail": "login required: HTTP basic auth (under /api/) or the session cookie of POST /login"},
            status_code=401,
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


def too_many_attempts(request: Request, exc: Exception) -> Response:
    """429 with Retry-After (whole seconds) for `TooManyAttempts`."""
    wait = exc.retry_after_s if isinstance(exc, TooManyAttempts) else 60.0
    return error_response(request, 429, str(exc), headers={"Retry-After": str(math.ceil(wait))})


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
    (TooManyAttempts, too_many_attempts),
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
        BadRequest: an unknown sort key, order, status or reason, or an age out of range.
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
    if older_than_h is not None and not 0 <= older_than_h <= MAX_AGE_H:  # NaN fails both comparisons
        raise BadRequest(f"older_than_h {older_than_h!r}: expected a number of hours from 0 to {MAX_AGE_H}")
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
