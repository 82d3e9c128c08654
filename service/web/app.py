"""The dosimetrists' worklist: server-rendered pages, a JSON API and health endpoints (FastAPI).

`create_app(settings, sessions=None)` builds the app once per process; the routes live in
`service.web.routes` by concern (`pages`, `api`, `health`), stay thin and call the keyword-only
functions in `service.web.crud`; what they share is in `service.web.deps`. Every route needs a
login except `/healthz`, `/login` and the static files (style sheet and script): pages and
`/readyz` take the session cookie set by `POST /login`; the API (`/api/...`) takes the same cookie
or HTTP basic auth. `/metrics` takes its bearer token. Every request first passes
`service.web.protection.SecurityMiddleware` (Host allow-list, same-origin rule for state-changing
requests, CSRF cookie, security headers); docs/security.md has the whole picture.

Errors answer with a reason: 401 (API, no or wrong credentials) or a redirect to the login page,
400/422 bad parameters or an unknown Host, 403 a cross-site request or a form without its CSRF
token, 404 unknown series/item/slice, 409 the worklist item's state forbids the action, 429 too
many failed logins, 503 from `/readyz` when a check failed.

Patient names and ids are shown to logged-in users only and are never logged; the access log
is off because URLs hold Series Instance UIDs.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker

from service.db.session import make_engine, make_session_factory
from service.settings import Settings
from service.web import security
from service.web.deps import ERROR_HANDLERS, WEB_DIR, format_age
from service.web.health import readiness_checks
from service.web.protection import SecurityMiddleware
from service.web.routes import api, health, metrics, pages, viewer


def create_app(
    settings: Settings,
    sessions: sessionmaker[Session] | None = None,
    *,
    login_throttle: security.LoginThrottle | None = None,
) -> FastAPI:
    """The worklist app for `settings`; `sessions` defaults to a factory on `settings.database_url`,
    `login_throttle` to one from the `web_login_*` settings on the monotonic clock.

    Raises:
        service.web.security.InsecureSettings: no session secret outside development (see `session_secret`).
    """
    signer = security.SessionSigner(
        secret=security.session_secret(settings),
        max_age_s=settings.web_session_hours * 3600.0,
        idle_s=settings.web_session_idle_minutes * 60.0,
    )
    if sessions is None:
        sessions = make_session_factory(make_engine(settings.database_url))
    templates = Jinja2Templates(directory=str(WEB_DIR / "templates"))
    templates.env.filters["age"] = format_age
    # Every POST form carries `<input type="hidden" name="csrf_token" value="{{ csrf_token(request) }}">`.
    templates.env.globals["csrf_token"] = lambda request: signer.csrf_token(request.state.csrf_nonce)

    app = FastAPI(title="CT Gatekeeper worklist", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.sessions = sessions
    app.state.signer = signer
    app.state.templates = templates
    app.state.readiness_checks = readiness_checks(settings, sessions)
    app.state.login_throttle = login_throttle or security.LoginThrottle.from_settings(settings)
    app.mount("/static", StaticFiles(directory=str(WEB_DIR / "static")), name="static")
    app.include_router(health.router)
    app.include_router(pages.router)
    app.include_router(api.router)
    app.include_router(viewer.router)
    app.include_router(metrics.router)
    for exc_class, handler in ERROR_HANDLERS:
        app.add_exception_handler(exc_class, handler)
    app.add_middleware(SecurityMiddleware, settings=settings)
    return app
