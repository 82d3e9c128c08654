"""The worklist as a hospital security review sees it, over real HTTP (uvicorn) against PostgreSQL.

Covers: the same-origin rule and CSRF tokens, basic auth on the API only and never challenged,
session revocation (logout, password change, disable/enable), login throttling (a clock the test
moves, so nothing waits), security headers on every route, the Host allow-list, 4xx for
out-of-range numbers, and the audit of an admin's release of someone else's claim. The attacks in
a real browser are in tests/test_web_security_browser.py.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_web import Env, example_path, make_settings, path_operations
from web_support import ANOMALY, PASSWORDS, csrf_token, login, seed_database, serve, write_phantom

from service.db.session import make_engine, make_session_factory
from service.db.tables import AuditEvent, Base, WorklistItem
from service.settings import Settings
from service.web import crud, security
from service.web.app import create_app

pytestmark = pytest.mark.integration


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("phantoms")
    return {
        "anomaly": write_phantom(out, anomaly=ANOMALY, seed=31),
        "geometry": write_phantom(out, anomaly=None, seed=32),
        "normal": write_phantom(out, anomaly=None, seed=33),
    }


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def env(
    tmp_path: Path, postgres_db_url: str, redis_url: str, phantoms: dict[str, Path], clock: FakeClock
) -> Iterator[Env]:
    settings = make_settings(tmp_path, postgres_db_url, redis_url, web_login_lockout_s=30, web_login_lockout_max_s=600)
    engine = make_engine(settings.database_url)
    Base.metadata.create_all(engine)
    sessions = make_session_factory(engine)
    seeded = seed_database(sessions, storage_dir=settings.storage_dir, phantoms=phantoms)
    app = create_app(settings, sessions, login_throttle=security.LoginThrottle.from_settings(settings, clock=clock))
    with serve(app) as url:
        yield Env(url, app, seeded, sessions)
    engine.dispose()


def item_status(env: Env, item_id: int) -> str:
    with env.sessions() as session:
        return str(session.get(WorklistItem, item_id).status)


# --- cross-site requests ----------------------------------------------------------------------------


def test_a_state_changing_request_without_origin_or_from_another_site_is_refused(env: Env) -> None:
    claim = f"/api/worklist/{env.seeded.flagged_item}/claim"
    alice = ("alice", PASSWORDS["alice"])
    refused = {
        "no Origin": {},
        "Origin null (sandboxed iframe, data: page)": {"Origin": "null"},
        "another site": {"Origin": "http://evil.example"},
        "another port": {"Origin": env.url.rsplit(":", 1)[0] + ":1"},
        "cross-site fetch": {"Origin": env.url, "Sec-Fetch-Site": "cross-site"},
        "same-site fetch (another port)": {"Origin": env.url, "Sec-Fetch-Site": "same-site"},
    }
    for why, headers in refused.items():
        response = httpx.post(env.url + claim, auth=alice, headers=headers, timeout=30)
        assert response.status_code == 403, why
        assert "refused" in response.json()["detail"], why
    assert item_status(env, env.seeded.flagged_item) == "open"
    allowed = httpx.post(env.url + claim, auth=alice, headers={"Origin": env.url, "Sec-Fetch-Site": "same-origin"})
    assert allowed.status_code == 200 and item_status(env, env.seeded.flagged_item) == "claimed"


def test_a_form_post_without_this_browsers_csrf_token_is_refused(env: Env) -> None:
    item = env.seeded.geometry_item
    with env.browser("bob") as bob, env.client() as other_browser:
        other_token = csrf_token(other_browser)
        for token in ("", "forged", other_token):
            refused = httpx.post(
                f"{env.url}/worklist/{item}/claim",
                data={"csrf_token": token},
                cookies=bob.cookies,
                headers={"Origin": env.url},
            )
            assert refused.status_code == 403 and "CSRF token" in refused.text, token
        assert item_status(env, item) == "open"
        assert bob.post(f"/worklist/{item}/claim").status_code == 303  # the page's own form: its token
    assert item_status(env, item) == "claimed"


def test_login_needs_the_csrf_token_of_the_login_page(env: Env) -> None:
    with httpx.Client(base_url=env.url, headers={"Origin": env.url}) as client:
        refused = client.post("/login", data={"name": "bob", "password": PASSWORDS["bob"]})
        assert refused.status_code == 403 and "gatekeeper_session" not in client.cookies


def test_an_api_call_with_the_cookie_needs_the_csrf_header(env: Env) -> None:
    item = env.seeded.flagged_item
    with env.browser("alice") as alice:
        without = httpx.post(f"{env.url}/api/worklist/{item}/claim", cookies=alice.cookies, headers={"Origin": env.url})
        assert without.status_code == 403 and "x-csrf-token" in without.json()["detail"]
        assert item_status(env, item) == "open"
        assert alice.post(f"/api/worklist/{item}/claim").status_code == 200  # PageClient sends the header


def test_basic_auth_opens_the_api_only_and_nothing_asks_the_browser_for_it(env: Env) -> None:
    alice = ("alice", PASSWORDS["alice"])
    page = httpx.get(f"{env.url}/worklist", auth=alice)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")
    for path in ("/readyz", "/api/me", "/api/readyz"):
        anonymous = httpx.get(env.url + path)
        assert anonymous.status_code == 401 and "www-authenticate" not in anonymous.headers, path
    assert httpx.get(f"{env.url}/readyz", auth=alice).status_code == 401
    assert httpx.get(f"{env.url}/api/readyz", auth=alice).status_code == 200


# --- revocation -------------------------------------------------------------------------------------


def copied_cookie_works(env: Env, cookie: str) -> bool:
    response = httpx.get(f"{env.url}/api/me", cookies={"gatekeeper_session": cookie})
    assert response.status_code in (200, 401), response.text
    return response.status_code == 200


def test_logout_ends_every_copy_of_the_cookie(env: Env) -> None:
    with env.browser("alice") as alice:
        copy = alice.cookies["gatekeeper_session"]
        assert copied_cookie_works(env, copy)
        assert alice.post("/logout").status_code == 303
    assert not copied_cookie_works(env, copy)
    with env.browser("alice") as again:  # logging in again opens a new session
        assert again.get("/api/me").status_code == 200
        assert not copied_cookie_works(env, copy)


def test_a_password_change_ends_the_sessions(env: Env) -> None:
    with env.browser("bob") as bob:
        copy = bob.cookies["gatekeeper_session"]
        with env.sessions() as session:
            crud.set_password(session=session, name="bob", password="a-new-password")
        assert bob.get("/api/me").status_code == 401
    assert not copied_cookie_works(env, copy)
    with env.client() as client:
        assert login(client, "bob", "a-new-password").status_code == 303


def test_disable_then_enable_does_not_bring_old_sessions_back(env: Env) -> None:
    with env.browser("bob") as bob:
        copy = bob.cookies["gatekeeper_session"]
        with env.sessions() as session:
            crud.set_user_active(session=session, name="bob", active=False)
        assert not copied_cookie_works(env, copy)
        with env.sessions() as session:
            crud.set_user_active(session=session, name="bob", active=True)
        assert not copied_cookie_works(env, copy)
    with env.browser("bob") as fresh:
        assert fresh.get("/api/me").json()["name"] == "bob"


def test_a_used_session_cookie_is_reissued_with_its_idle_clock_restarted(env: Env) -> None:
    signer = env.app.state.signer
    alice = env.seeded.user_ids["alice"]
    now = time.time()
    old = signer.sign(alice, 0, issued_at=now - 600, now=now - 600)  # last used 10 min ago
    response = httpx.get(f"{env.url}/api/me", cookies={"gatekeeper_session": old})
    assert response.status_code == 200
    fresh = response.cookies["gatekeeper_session"]
    claims = signer.read(fresh)
    assert claims is not None and claims.issued_at == int(now - 600) and claims.seen_at >= int(now)
    assert "httponly" in response.headers["set-cookie"].lower()
    recent = signer.sign(alice, 0, now=now)  # used just now: not re-issued
    assert "gatekeeper_session" not in httpx.get(f"{env.url}/api/me", cookies={"gatekeeper_session": recent}).cookies


def test_the_session_cookie_is_refreshed_with_use_and_ends_when_idle() -> None:
    signer = security.SessionSigner(secret=b"k" * 32, max_age_s=3600, idle_s=600)
    cookie = signer.sign(7, 3, now=1000)
    assert signer.read(cookie, now=1599) == security.SessionClaims(7, 3, 1000, 1000)
    assert signer.read(cookie, now=1601) is None  # idle for more than 10 min
    refreshed = signer.sign(7, 3, issued_at=1000, now=1500)
    assert signer.read(refreshed, now=2000) is not None
    assert signer.read(signer.sign(7, 3, issued_at=1000, now=4500), now=4601) is None  # older than an hour
    assert signer.read(cookie.replace("7.3.", "8.3.", 1), now=1001) is None  # another user: the MAC fails


# --- throttling -------------------------------------------------------------------------------------


def test_the_sixth_wrong_password_locks_the_name_out_even_for_the_right_one(
    env: Env, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with env.client() as client:
        for _ in range(5):
            assert login(client, "alice", "wrong-password-123").status_code == 401
        locked = login(client, "alice")
        assert locked.status_code == 429 and int(locked.headers["retry-after"]) == 30
        assert "Too many failed logins" in locked.text
        basic = httpx.get(f"{env.url}/api/me", auth=("alice", PASSWORDS["alice"]))  # basic auth: the same lock
        assert basic.status_code == 429 and basic.headers["retry-after"] == "30"
        clock.now += 29
        assert login(client, "alice").status_code == 429
        clock.now += 2
        assert login(client, "alice").status_code == 303  # the lock has run out; success clears the count
    failures = [r.getMessage() for r in caplog.records if "login failed" in r.getMessage()]
    assert len(failures) == 5 and all("'alice'" in m and "127.0.0.1" in m for m in failures)
    assert "wrong-password-123" not in caplog.text and PASSWORDS["alice"] not in caplog.text


def test_the_lockout_doubles_with_each_further_failure(env: Env, clock: FakeClock) -> None:
    alice = ("alice", "wrong-password-123")
    for _ in range(5):
        assert httpx.get(f"{env.url}/api/me", auth=alice).status_code == 401
    assert httpx.get(f"{env.url}/api/me", auth=alice).headers["retry-after"] == "30"
    clock.now += 31
    assert httpx.get(f"{env.url}/api/me", auth=alice).status_code == 401  # the 6th try: wrong again
    assert httpx.get(f"{env.url}/api/me", auth=alice).headers["retry-after"] == "60"
    clock.now += 61
    assert httpx.get(f"{env.url}/api/me", auth=alice).status_code == 401
    assert httpx.get(f"{env.url}/api/me", auth=alice).headers["retry-after"] == "120"


def test_guessing_across_user_names_locks_the_address_out(env: Env) -> None:
    with env.client() as client:
        for name in ("bob", "admin", "carol", "dave", "erin"):
            assert login(client, name, "wrong-password-123").status_code == 401
        assert login(client, "alice").status_code == 429  # a name never tried, from the same address


def test_the_throttle_counts_parallel_tries_and_forgets_on_success() -> None:
    clock = FakeClock()
    throttle = security.LoginThrottle(free_failures=2, lockout_s=10, lockout_max_s=100, clock=clock)
    assert throttle.attempt(name="A", address="x") == 0  # not yet known to fail: counted anyway
    throttle.succeeded(name="a", address="x")  # names compare case-insensitively
    assert throttle.attempt(name="a", address="x") == 0
    assert throttle.attempt(name="a", address="y") == 0
    assert throttle.attempt(name="a", address="z") == 10  # two tries in flight or failed: locked
    with pytest.raises(ValueError, match="lockout_max_s"):
        security.LoginThrottle(free_failures=5, lockout_s=10, lockout_max_s=5)


# --- headers, hosts, numbers ------------------------------------------------------------------------


def test_every_answer_carries_the_security_headers(env: Env) -> None:
    paths = {example_path(path, env) for path, methods in path_operations(env.app) if "GET" in methods}
    paths |= {"/static/style.css", "/static/viewer.js", "/no-such-page", "/api/no-such-thing"}
    checked = 0
    with env.browser("admin") as admin, env.client() as anonymous:
        for client in (admin, anonymous):
            for path in sorted(paths):
                response = client.get(path, headers={"Authorization": f"Bearer {'t' * 40}"})
                csp = response.headers.get("content-security-policy", "")
                assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, path
                assert "unsafe-inline" not in csp, path
                assert response.headers["x-content-type-options"] == "nosniff", path
                assert response.headers["x-frame-options"] == "DENY", path
                assert response.headers["referrer-policy"] == "same-origin", path
                cache = response.headers["cache-control"]
                if response.headers.get("content-type", "").startswith(("text/html", "application/json")):
                    assert "no-store" in cache or "no-cache" in cache, (path, cache)
                    if response.status_code == 200 and not path.endswith("viewer.json"):
                        assert cache == "no-store", (path, cache)  # patient names: never stored
                elif path.endswith(".png") and response.status_code == 200:
                    assert cache.startswith("private"), (path, cache)
                checked += 1
        # Error answers of the middleware itself, too.
        for response in (
            anonymous.get("/healthz", headers={"Host": "evil.example"}),
            httpx.post(f"{env.url}/logout"),
        ):
            assert response.status_code in (400, 403)
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert checked >= 30


def test_pages_have_no_inline_script_or_style(env: Env) -> None:
    with env.browser("admin") as admin:
        pages = [admin.get(p).text for p in ("/login", "/worklist", "/audit", f"/series/{env.seeded.flagged_uid}")]
    for html in pages:
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline <script>"
        assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=", html), "inline style or event handler"


def test_an_unknown_host_is_refused(env: Env, tmp_path: Path, postgres_db_url: str, redis_url: str) -> None:
    port = env.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"rebind.attacker.example:{port}", "", "127.0.0.1.nip.io"):
        response = httpx.get(f"{env.url}/login", headers={"Host": host})
        assert response.status_code == 400, host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST"):
        assert httpx.get(f"{env.url}/login", headers={"Host": host}).status_code == 200, host
    settings = make_settings(tmp_path / "named", postgres_db_url, redis_url, web_allowed_hosts="gatekeeper.example")
    with serve(create_app(settings, env.sessions)) as url:
        assert httpx.get(f"{url}/healthz").status_code == 400  # 127.0.0.1 is no longer in the list
        named = httpx.get(f"{url}/healthz", headers={"Host": "gatekeeper.example"})
        assert named.status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/api/worklist?older_than_h=inf",
        "/api/worklist?older_than_h=nan",
        "/api/worklist?older_than_h=1e300",
        "/api/worklist?older_than_h=-1",
        "/worklist?older_than_h=inf",
        "/worklist?older_than_h=nan",
        "/worklist?older_than_h=1e300",
        "/api/series/{uid}?version=9223372036854775808",
        "/series/{uid}?version=9223372036854775808",
        "/series/{uid}/versions/9223372036854775808/slices/0.png",
        "/series/{uid}/versions/1/slices/9223372036854775808.png",
        "/series/{uid}/versions/9223372036854775807/viewer.json",
        "/series/{uid}/versions/1/viewer/slices/18446744073709551616.png",
        "/api/audit?limit=9223372036854775808",
    ],
)
def test_out_of_range_numbers_are_4xx(env: Env, path: str) -> None:
    with env.browser("admin") as admin:
        response = admin.get(path.replace("{uid}", env.seeded.flagged_uid))
    assert 400 <= response.status_code < 500 and response.status_code != 404, (path, response.status_code)


@pytest.mark.parametrize("item_id", ["9223372036854775808", "2147483648", "0", "-1"])
def test_out_of_range_item_ids_are_422(env: Env, item_id: str) -> None:
    with env.browser("admin") as admin:
        for path in (f"/api/worklist/{item_id}/claim", f"/worklist/{item_id}/claim", f"/worklist/{item_id}/assign"):
            assert admin.post(path).status_code == 422, path


def test_an_admins_release_of_another_users_claim_names_the_claimer_in_the_audit(env: Env) -> None:
    item = env.seeded.flagged_item
    assert env.client("alice").post(f"/api/worklist/{item}/claim").status_code == 200
    assert env.client("admin").post(f"/api/worklist/{item}/release").status_code == 200
    audit = env.client("admin").get("/api/audit").json()
    release = next(a for a in audit if a["action"] == "release")
    assert release["user"] == "admin" and release["detail"] == {"claimed_by": env.seeded.user_ids["alice"]}
    with env.sessions() as session:
        assert (
            session.query(AuditEvent).filter_by(action="release").one().detail["claimed_by"]
            == (env.seeded.user_ids["alice"])
        )


# --- settings ---------------------------------------------------------------------------------------


def test_the_security_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="web_session_idle_minutes"):
        Settings(storage_dir=tmp_path, web_session_hours=1, web_session_idle_minutes=90)
    with pytest.raises(ValueError, match="web_allowed_hosts"):
        Settings(storage_dir=tmp_path, web_allowed_hosts="https://gatekeeper.example/")
    with pytest.raises(ValueError, match="web_proxy_addresses"):
        Settings(storage_dir=tmp_path, web_proxy_addresses="proxy.example")
    with pytest.raises(ValueError, match="web_login_lockout_max_s"):
        Settings(storage_dir=tmp_path, web_login_lockout_s=60, web_login_lockout_max_s=30)
    default: Any = Settings(storage_dir=tmp_path, web_bind_address="10.1.2.3")
    assert default.web_trusted_hosts == ["10.1.2.3", "localhost", "127.0.0.1", "::1"]
    named = Settings(storage_dir=tmp_path, web_allowed_hosts="Gatekeeper.Example, ::1")
    assert named.web_trusted_hosts == ["gatekeeper.example", "::1"]
