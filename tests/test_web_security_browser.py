"""The attacks of the security review, replayed in headless Chromium (Debian's package, driven by Playwright).

The worklist runs on http://127.0.0.1:<port>; the attacker's pages on another origin,
http://evil.test:<other port>, which Chromium resolves to 127.0.0.1 (`--host-resolver-rules`), and
the same pages as http://127.0.0.1:<other port> (same site, another origin: the browser sends the
SameSite=Lax session cookie along). Each attack must be refused, and the database must show that
nothing changed:

1. a sandboxed iframe (`Origin: null`) posts a claim while the browser attaches basic-auth
   credentials to every request (what a browser that once answered a basic-auth dialog does);
2. login CSRF: another site's form logs the victim into the attacker's account;
3. a page on another port frames the worklist of the logged-in victim (clickjacking).

What reached the worklist is read from a recorder around the app (a navigation inside a cross-site
iframe runs in another renderer process, whose network events Playwright may report late or not).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from test_web import make_settings
from web_support import ANOMALY, PASSWORDS, seed_database, serve, write_phantom

from service.db.session import make_engine, make_session_factory
from service.db.tables import Base, WorklistItem
from service.web.app import create_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
EVIL_HOST = "evil.test"


@dataclass(frozen=True)
class Seen:
    """One request the worklist answered: method, path, status, and its Origin and CSP headers."""

    method: str
    path: str
    status: int
    origin: str | None
    csp: str | None


class Recorder:
    """ASGI wrapper that keeps what the app answered, request by request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen: list[Seen] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = dict(scope["headers"]).get(b"origin")

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                csp = dict(message["headers"]).get(b"content-security-policy")
                self.seen.append(
                    Seen(
                        scope["method"],
                        scope["path"],
                        message["status"],
                        origin.decode() if origin is not None else None,
                        csp.decode() if csp is not None else None,
                    )
                )
            await send(message)

        await self.app(scope, receive, record)

    def wait_for(self, method: str, path: str, *, timeout_s: float = 60.0) -> Seen:
        """The first answered `method` `path`, waiting for it up to `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [s for s in self.seen if s.method == method and s.path == path]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"{method} {path} never reached the worklist: {self.seen}"
            time.sleep(0.05)


@dataclass(frozen=True)
class Stage:
    url: str  # the worklist
    evil: str  # the attacker's origin on another site (evil.test)
    other_port: str  # the attacker's pages on this site, another port
    sessions: object
    item_id: int
    recorder: Recorder


def attacker_app(pages: dict[str, str]) -> FastAPI:
    """Another site: serves `pages` (path → HTML) as they are, with no protection of any kind."""
    app = FastAPI()
    for path, html in pages.items():
        app.add_api_route(path, lambda html=html: HTMLResponse(html), methods=["GET"])
    return app


def attacker_pages(target: str, item_id: int) -> dict[str, str]:
    claim_form = (
        f"<form method='post' action='{target}/api/worklist/{item_id}/claim'></form>"
        "<script>document.forms[0].submit()</script>"
    )
    login_form = (
        f"<form method='post' action='{target}/login'>"
        f"<input name='name' value='bob'><input name='password' value='{PASSWORDS['bob']}'>"
        "<input name='next' value='/worklist'></form><script>document.forms[0].submit()</script>"
    )
    return {
        # srcdoc in a sandbox without allow-same-origin: the form's Origin is "null".
        "/sandboxed-claim": f'<iframe sandbox="allow-forms allow-scripts" srcdoc="{claim_form}"></iframe>',
        "/login-csrf": login_form,
        "/frame-worklist": f'<h1>Win a prize</h1><iframe id="victim" src="{target}/worklist"></iframe>',
    }


@pytest.fixture
def stage(tmp_path: Path, postgres_db_url: str, redis_url: str) -> Iterator[Stage]:
    phantoms = {
        "anomaly": write_phantom(tmp_path / "phantoms", anomaly=ANOMALY, seed=41),
        "geometry": write_phantom(tmp_path / "phantoms", anomaly=None, seed=42),
        "normal": write_phantom(tmp_path / "phantoms", anomaly=None, seed=43),
    }
    settings = make_settings(tmp_path, postgres_db_url, redis_url)
    engine = make_engine(settings.database_url)
    Base.metadata.create_all(engine)
    sessions = make_session_factory(engine)
    seeded = seed_database(sessions, storage_dir=settings.storage_dir, phantoms=phantoms)
    recorder = Recorder(create_app(settings, sessions))
    with ExitStack() as stack:
        url = stack.enter_context(serve(recorder))  # type: ignore[arg-type]
        other = stack.enter_context(serve(attacker_app(attacker_pages(url, seeded.flagged_item))))
        yield Stage(url, other.replace("127.0.0.1", EVIL_HOST), other, sessions, seeded.flagged_item, recorder)
    engine.dispose()


def item_status(stage: Stage) -> str:
    with stage.sessions() as session:  # type: ignore[operator]
        return str(session.get(WorklistItem, stage.item_id).status)


def test_another_sites_attacks_are_refused_in_a_real_browser(stage: Stage) -> None:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is missing: apt-get install chromium (make system-deps)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[f"--host-resolver-rules=MAP {EVIL_HOST} 127.0.0.1"],
        )
        try:
            # 1. Basic-auth credentials on every request, the way a browser that once answered the
            #    dialog sends them; a sandboxed iframe on the other site posts a claim (Origin: null).
            alice = base64.b64encode(f"alice:{PASSWORDS['alice']}".encode()).decode()
            cached = browser.new_context(extra_http_headers={"Authorization": f"Basic {alice}"})
            page = cached.new_page()
            page.goto(f"{stage.evil}/sandboxed-claim")
            claim = f"/api/worklist/{stage.item_id}/claim"
            posted = stage.recorder.wait_for("POST", claim)
            assert (posted.origin, posted.status) == ("null", 403)
            assert item_status(stage) == "open"
            # The same credentials from the worklist's own origin do work (the API is for scripts).
            own = page.request.post(stage.url + claim, headers={"Origin": stage.url})
            assert own.status == 200 and item_status(stage) == "claimed"
            own = page.request.post(f"{stage.url}/api/worklist/{stage.item_id}/release", headers={"Origin": stage.url})
            assert own.status == 200 and item_status(stage) == "open"
            cached.close()

            # 2. Login CSRF: the other site's form would log the victim in as bob.
            victim = browser.new_context()
            page = victim.new_page()
            page.goto(f"{stage.evil}/login-csrf")
            posted = stage.recorder.wait_for("POST", "/login")
            assert (posted.origin, posted.status) == (stage.evil, 403)
            page.wait_for_url(f"{stage.url}/login")  # the refusal is what the victim sees
            assert "refused" in page.content()
            assert not [c for c in victim.cookies() if c["name"] == "gatekeeper_session"]

            # 3. The victim logs in for real, then opens a page on another port of this host,
            #    which frames the worklist: the session cookie goes along (same site), the worklist
            #    answers with patient names, and the browser must not show them.
            page.goto(f"{stage.url}/login")
            page.fill("input[name=name]", "alice")
            page.fill("input[name=password]", PASSWORDS["alice"])
            page.click("button[type=submit]")
            page.wait_for_url(f"{stage.url}/worklist")
            assert "Doe^Jane" in page.content()  # logged in: the worklist shows patient names
            answered = len([s for s in stage.recorder.seen if s.path == "/worklist"])
            page.goto(f"{stage.other_port}/frame-worklist")  # returns after the load event: frames included
            framed = [s for s in stage.recorder.seen if s.path == "/worklist"][answered:]
            assert [s.status for s in framed] == [200], framed  # the cookie went along: the list was sent
            assert framed[0].csp is not None and "frame-ancestors 'none'" in framed[0].csp
            frames = [frame for frame in page.frames if frame != page.main_frame]
            assert len(frames) == 1
            assert "Doe^Jane" not in frames[0].content() and "Manual contouring worklist" not in frames[0].content()
            victim.close()
        finally:
            browser.close()
    assert item_status(stage) == "open"
