"""The worklist over real HTTP (uvicorn) against a real PostgreSQL database.

Covers: login everywhere but /healthz, the session cookie and basic auth, the worklist and series
JSON, claim/release/done with their conflicts, the series page and its slice picture, /readyz, and
the `gatekeeper users` command.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import routing
from fastapi.routing import APIRoute
from ingest_support import upgrade
from PIL import Image
from sqlalchemy import select
from web_support import (
    ANOMALY,
    GATE_WORDS,
    PASSWORDS,
    THRESHOLD,
    PageClient,
    Seeded,
    login,
    seed_database,
    serve,
    write_model_dir,
    write_phantom,
)

from service.db.session import make_engine, make_session_factory
from service.db.tables import Base, Series, SeriesEvent, WorklistItem
from service.settings import Settings, get_settings
from service.web import security
from service.web.app import create_app

pytestmark = pytest.mark.integration

SECRET = "s" * 40


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("phantoms")
    return {
        "anomaly": write_phantom(out, anomaly=ANOMALY, seed=11),
        "geometry": write_phantom(out, anomaly=None, seed=12),
        "normal": write_phantom(out, anomaly=None, seed=13),
    }


def make_settings(tmp_path: Path, database_url: str, broker_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "storage_dir": tmp_path / "storage",
        "database_url": database_url,
        "broker_url": broker_url,
        "web_secret_key": SECRET,
        "detector_model_dir": write_model_dir(tmp_path / "detector"),
        "segmenter_model_dir": write_model_dir(tmp_path / "segmenter"),
        "min_free_disk_bytes": 0,
        "max_disk_used_fraction": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


class Env:
    """A running worklist: base URL, the app, seeded ids and the database sessions."""

    def __init__(self, url: str, app: Any, seeded: Seeded, sessions: Any) -> None:
        self.url, self.app, self.seeded, self.sessions = url, app, seeded, sessions

    def client(self, user: str | None = None) -> PageClient:
        """A client that sends what the pages send (Origin, CSRF token); with `user`, their basic auth."""
        auth = (user, PASSWORDS[user]) if user else None
        return PageClient(self.url, auth=auth, follow_redirects=False, timeout=30)

    @contextmanager
    def browser(self, user: str) -> Iterator[PageClient]:
        """A client logged in as `user` through the login form (the session cookie: pages take no basic auth)."""
        with self.client() as client:
            response = login(client, user)
            assert response.status_code == 303, response.text
            yield client


@pytest.fixture
def env(tmp_path: Path, postgres_db_url: str, redis_url: str, phantoms: dict[str, Path]) -> Iterator[Env]:
    settings = make_settings(tmp_path, postgres_db_url, redis_url)
    engine = make_engine(settings.database_url)
    Base.metadata.create_all(engine)
    sessions = make_session_factory(engine)
    seeded = seed_database(sessions, storage_dir=settings.storage_dir, phantoms=phantoms)
    app = create_app(settings, sessions)
    with serve(app) as url:
        yield Env(url, app, seeded, sessions)
    engine.dispose()


def path_operations(app: Any) -> list[tuple[str, set[str]]]:
    """(full path, methods) of every path operation of `app`, including those of its included routers.

    Since FastAPI 0.137 `app.routes` keeps an included router as one node; `iter_route_contexts`
    walks that tree. Before, `app.routes` was already the flat list.
    """
    routes = routing.iter_route_contexts(app.routes) if hasattr(routing, "iter_route_contexts") else app.routes
    return [
        (route.path, set(route.methods))
        for route in routes
        if isinstance(getattr(route, "original_route", route), APIRoute)
    ]


def example_path(path: str, env: Env) -> str:
    """The route `path` with its parameters filled with existing ids."""
    values = {
        "series_instance_uid": env.seeded.flagged_uid,
        "item_id": str(env.seeded.flagged_item),
        "action": "claim",
        "version": "1",
        "index": "0",
    }
    return re.sub(r"{(\w+)(:\w+)?}", lambda m: values[m.group(1)], path)


def test_healthz_answers_without_login(env: Env) -> None:
    response = env.client().get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_every_route_but_health_and_login_refuses_anonymous_requests(env: Env) -> None:
    # /metrics takes its bearer token instead (tests/test_metrics.py).
    open_routes = {"/healthz", "/login", "/logout", "/metrics"}
    checked = 0
    with env.client() as client:
        for path, methods in path_operations(env.app):
            if path in open_routes:
                continue
            for method in methods:
                response = client.request(method, example_path(path, env))
                if path.startswith("/api/") or path == "/readyz":
                    assert response.status_code == 401, (method, path)
                    # No challenge: a browser must never offer to remember basic-auth credentials.
                    assert "www-authenticate" not in response.headers, (method, path)
                else:
                    assert response.status_code == 303, (method, path)
                    assert response.headers["location"].startswith("/login?next=")
                checked += 1
    assert checked >= 10
    # Nothing was changed by the anonymous POSTs.
    with env.sessions() as session:
        assert session.get(WorklistItem, env.seeded.flagged_item).status == "open"


def test_wrong_basic_auth_password_is_401(env: Env) -> None:
    with httpx.Client(base_url=env.url, auth=("alice", "wrong-password")) as client:
        assert client.get("/api/worklist").status_code == 401


def test_login_form_sets_a_session_cookie_that_opens_pages_and_api(env: Env) -> None:
    with env.client() as client:
        refused = client.post("/login", data={"name": "alice", "password": "nope", "next": "/worklist"})
        assert refused.status_code == 401 and "Wrong user name or password" in refused.text
        assert "gatekeeper_session" not in client.cookies

        response = client.post(
            "/login", data={"name": "alice", "password": PASSWORDS["alice"], "next": "/worklist?sort=score"}
        )
        assert response.status_code == 303 and response.headers["location"] == "/worklist?sort=score"
        assert "httponly" in response.headers["set-cookie"].lower()
        page = client.get("/worklist")
        assert page.status_code == 200 and "Doe^Jane" in page.text and "alice" in page.text
        assert client.get("/api/me").json() == {"name": "alice", "role": "dosimetrist"}

        client.post("/logout")
        assert client.get("/api/me").status_code == 401


def test_login_redirects_only_within_the_site(env: Env) -> None:
    with env.client() as client:
        response = client.post(
            "/login", data={"name": "alice", "password": PASSWORDS["alice"], "next": "//evil.example/steal"}
        )
        assert response.headers["location"] == "/worklist"


def test_a_forged_or_expired_cookie_is_not_a_login(env: Env) -> None:
    signer = security.SessionSigner(secret=SECRET.encode(), max_age_s=3600, idle_s=600)
    alice = env.seeded.user_ids["alice"]
    forged = security.SessionSigner(secret=b"x" * 32, max_age_s=3600, idle_s=600).sign(alice, 0)
    expired = signer.sign(alice, 0, now=0)
    now = time.time()
    idle = signer.sign(alice, 0, issued_at=now - 2000, now=now - 2000)  # young, unused past the 30 min default
    for value in (forged, expired, idle, "garbage"):
        with httpx.Client(base_url=env.url, cookies={"gatekeeper_session": value}) as client:
            assert client.get("/api/me").status_code == 401
    with httpx.Client(base_url=env.url, cookies={"gatekeeper_session": signer.sign(alice, 0)}) as client:
        assert client.get("/api/me").status_code == 200


def test_worklist_json_lists_the_worklisted_series_with_scores(env: Env) -> None:
    entries = env.client("bob").get("/api/worklist").json()
    by_uid = {e["series_instance_uid"]: e for e in entries}
    assert set(by_uid) == {env.seeded.flagged_uid, env.seeded.geometry_uid}
    flagged = by_uid[env.seeded.flagged_uid]
    assert flagged["reason"] == "anomaly" and flagged["status"] == "open"
    assert flagged["score"] == pytest.approx(0.85) and flagged["threshold"] == THRESHOLD
    assert flagged["flagged_slices"] == {"first": 5, "last": 8, "count": 4}
    assert flagged["patient_name"] == "Doe^Jane" and flagged["age_s"] >= 7000
    assert flagged["url"].startswith("/series/")
    # The gate's fired findings, in plain words (the ones that did not fire are not listed).
    assert [(f["signal"], f["words"], f["slices"]) for f in flagged["findings"]] == [("tta_dice", GATE_WORDS, [5, 8])]
    geometry = by_uid[env.seeded.geometry_uid]
    assert geometry["reason"] == "geometry" and geometry["score"] is None and geometry["threshold"] is None
    assert geometry["findings"] == []  # routed before the gate recorded findings
    # Default order: oldest first; sortable by score (entries without a score last).
    assert [e["id"] for e in entries] == [env.seeded.flagged_item, env.seeded.geometry_item]
    by_score = env.client("bob").get("/api/worklist", params={"sort": "score", "order": "asc"}).json()
    assert by_score[-1]["score"] is None


def test_claim_by_another_user_is_409_with_the_reason(env: Env) -> None:
    item = env.seeded.flagged_item
    claimed = env.client("alice").post(f"/api/worklist/{item}/claim")
    assert claimed.status_code == 200
    assert claimed.json()["status"] == "claimed" and claimed.json()["claimed_by"] == "alice"
    assert env.client("alice").post(f"/api/worklist/{item}/claim").status_code == 200  # again: no-op

    for action in ("claim", "release", "done"):
        conflict = env.client("bob").post(f"/api/worklist/{item}/{action}")
        assert conflict.status_code == 409, action
        assert "claimed by alice" in conflict.json()["detail"]

    with env.sessions() as session:
        series = session.scalar(select(Series).where(Series.series_instance_uid == env.seeded.flagged_uid))
        assert series.state == "claimed"
        kinds = session.scalars(select(SeriesEvent.kind).where(SeriesEvent.series_id == series.id)).all()
        assert "worklist_claimed" in kinds


def test_an_admin_may_release_another_users_claim(env: Env) -> None:
    item = env.seeded.flagged_item
    env.client("alice").post(f"/api/worklist/{item}/claim")
    released = env.client("admin").post(f"/api/worklist/{item}/release")
    assert released.status_code == 200 and released.json()["status"] == "open"
    assert released.json()["claimed_by"] is None
    assert env.client("bob").post(f"/api/worklist/{item}/claim").json()["claimed_by"] == "bob"


def test_done_needs_a_claim_and_moves_the_series_to_done(env: Env) -> None:
    item = env.seeded.flagged_item
    early = env.client("alice").post(f"/api/worklist/{item}/done")
    assert early.status_code == 409 and "claim it first" in early.json()["detail"]
    env.client("alice").post(f"/api/worklist/{item}/claim")
    done = env.client("alice").post(f"/api/worklist/{item}/done")
    assert done.status_code == 200 and done.json()["status"] == "done" and done.json()["done_at"]
    assert env.client("alice").post(f"/api/worklist/{item}/claim").status_code == 409
    assert env.seeded.flagged_uid not in {
        e["series_instance_uid"] for e in env.client("alice").get("/api/worklist").json()
    }
    assert [e["id"] for e in env.client("alice").get("/api/worklist", params={"status": "done"}).json()] == [item]
    series = env.client("alice").get(f"/api/series/{env.seeded.flagged_uid}").json()
    assert series["state"] == "done"


def test_form_posts_claim_and_redirect_back(env: Env) -> None:
    with env.client() as client:
        client.post("/login", data={"name": "bob", "password": PASSWORDS["bob"]})
        response = client.post(f"/worklist/{env.seeded.geometry_item}/claim", data={"next": "/worklist?sort=age"})
        assert response.status_code == 303 and response.headers["location"] == "/worklist?sort=age"
        conflict_page = env.client()
        conflict_page.post("/login", data={"name": "alice", "password": PASSWORDS["alice"]})
        refused = conflict_page.post(f"/worklist/{env.seeded.geometry_item}/release")
        assert refused.status_code == 409 and "claimed by bob" in refused.text


def test_series_json_has_route_state_score_and_slices(env: Env) -> None:
    body = env.client("alice").get(f"/api/series/{env.seeded.flagged_uid}").json()
    assert body["route"] == "worklist" and body["route_reason"] == "anomaly" and body["state"] == "worklisted"
    assert body["score"] == pytest.approx(0.85) and body["threshold"] == THRESHOLD and body["flagged"] is True
    assert [s["index"] for s in body["slices"]] == list(range(12))
    assert all({"index", "sop_instance_uid", "position", "score"} <= set(s) for s in body["slices"])
    assert len(body["top_slices"]) == 3 and all(t["has_residual_map"] for t in body["top_slices"])
    assert body["worklist"]["id"] == env.seeded.flagged_item
    # The gate's decision: every finding with its value, threshold, slices, whether it fired, in words.
    gate = body["gate"]
    assert gate["manual"] and gate["reason"] == "anomaly" and gate["gate_version"] == "gate-test-1"
    assert (gate["segmenter_version"], gate["detector_version"]) == ("seg-test-1", "test-model-1")
    assert (gate["fused"], gate["fused_threshold"]) == (3.1, 2.0)
    assert gate["findings"] == [
        {"signal": "tta_dice", "value": 0.81, "threshold": 0.93, "fired": True, "slices": [5, 8], "words": GATE_WORDS},
        {
            "signal": "entropy",
            "value": 0.02,
            "threshold": 0.05,
            "fired": False,
            "slices": None,
            "words": "segmenter confident around the liver (entropy 0.02; normal ≤ 0.05)",
        },
    ]

    delivered = env.client("alice").get(f"/api/series/{env.seeded.delivered_uid}").json()
    assert delivered["route"] == "auto" and delivered["state"] == "delivered" and delivered["worklist"] is None
    assert delivered["gate"] is None  # no decision recorded for it


def test_worklist_and_series_pages_show_the_gates_findings_in_words_escaped(env: Env) -> None:
    escaped = GATE_WORDS.replace("&", "&amp;").replace("<", "&lt;")
    with env.client() as client:
        client.post("/login", data={"name": "alice", "password": PASSWORDS["alice"]})
        worklist = client.get("/worklist").text
        series = client.get(f"/series/{env.seeded.flagged_uid}").text
    assert escaped in worklist and GATE_WORDS not in worklist
    assert "segmenter confident" not in worklist  # only what fired, on the worklist
    assert 'id="gate"' in series and escaped in series and "segmenter confident around the liver" in series
    assert "gate-test-1" in series and "<code>tta_dice</code>" in series


def test_series_versions_default_to_the_newest(env: Env) -> None:
    with env.sessions() as session:
        old = session.scalar(select(Series).where(Series.series_instance_uid == env.seeded.delivered_uid))
        session.add(
            Series(
                series_instance_uid=old.series_instance_uid,
                version=2,
                study_instance_uid=old.study_instance_uid,
                modality="CT",
                calling_ae_title="CT1",
                state="scoring",
                first_received_at=old.first_received_at,
                last_received_at=old.last_received_at,
            )
        )
        session.commit()
    client = env.client("alice")
    newest = client.get(f"/api/series/{env.seeded.delivered_uid}").json()
    assert (
        newest["version"] == 2 and newest["state"] == "scoring" and newest["score"] is None and newest["slices"] == []
    )
    assert client.get(f"/api/series/{env.seeded.delivered_uid}", params={"version": 1}).json()["state"] == "delivered"


def test_bad_input_is_4xx_with_a_reason(env: Env) -> None:
    client = env.client("alice")
    unknown = client.get("/api/series/1.2.3.999")
    assert unknown.status_code == 404 and "1.2.3.999" in unknown.json()["detail"]
    assert client.get(f"/api/series/{env.seeded.flagged_uid}", params={"version": 7}).status_code == 404
    assert client.get(f"/api/series/{env.seeded.flagged_uid}", params={"version": 0}).status_code == 422
    assert client.post("/api/worklist/999999/claim").status_code == 404
    bad_action = client.post(f"/api/worklist/{env.seeded.flagged_item}/steal")
    assert bad_action.status_code == 400 and "claim, release, done" in bad_action.json()["detail"]
    bad_sort = client.get("/api/worklist", params={"sort": "shoe_size"})
    assert bad_sort.status_code == 400 and "sort key" in bad_sort.json()["detail"]
    assert client.get("/api/worklist", params={"status": "lost"}).status_code == 400
    cross_site = client.post(
        f"/api/worklist/{env.seeded.flagged_item}/claim", headers={"Origin": "https://evil.example"}
    )
    assert cross_site.status_code == 403
    assert client.get("/worklist").status_code == 303  # basic auth opens the API only, not pages
    with env.client() as browser:
        login(browser, "alice")
        missing_slice = browser.get(f"/series/{env.seeded.flagged_uid}/versions/1/slices/99.png")
    assert missing_slice.status_code == 404


def test_series_page_shows_the_score_plot_and_the_heat_map_pictures(env: Env) -> None:
    with env.client() as client:
        client.post("/login", data={"name": "alice", "password": PASSWORDS["alice"]})
        page = client.get(f"/series/{env.seeded.flagged_uid}")
        assert page.status_code == 200
        assert "<svg" in page.text and 'class="threshold"' in page.text and "Doe^Jane" in page.text
        images = re.findall(r'<img src="([^"]+)"', page.text)
        assert len(images) == 3
        picture = client.get(images[0])
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(picture.content))
        assert image.height == 64 and image.width > 2 * 64  # the slice, a gap, the slice with the heat map
        # The heat-map half differs from the plain half where the residual is high.
        pixels = image.convert("RGB")
        left, right = pixels.getpixel((38, 30)), pixels.getpixel((image.width - 64 + 38, 30))
        assert left != right
        # A slice without a residual map is the plain slice.
        plain = Image.open(io.BytesIO(client.get(f"/series/{env.seeded.flagged_uid}/versions/1/slices/0.png").content))
        assert plain.size == (64, 64)


def test_a_disabled_user_is_logged_out_at_once(env: Env) -> None:
    with env.client() as client:
        client.post("/login", data={"name": "bob", "password": PASSWORDS["bob"]})
        assert client.get("/api/me").status_code == 200
        with env.sessions() as session:
            from service.web import crud

            crud.set_user_active(session=session, name="bob", active=False)
        assert client.get("/api/me").status_code == 401
    assert env.client("bob").get("/api/me").status_code == 401


def test_readyz_names_each_check(env: Env) -> None:
    response = env.client("alice").get("/api/readyz")  # basic auth: under /api/ only
    assert response.status_code == 200, response.text
    assert env.client("alice").get("/readyz").status_code == 401  # the cookie only
    body = response.json()
    assert body["status"] == "ok"
    assert [c["name"] for c in body["checks"]] == [
        "database",
        "broker",
        "detector_model",
        "segmenter_model",
        "gate",
        "disk",
    ]


def test_readyz_with_a_dead_broker_is_503_naming_it(
    tmp_path: Path, postgres_db_url: str, phantoms: dict[str, Path]
) -> None:
    from conftest import free_port

    settings = make_settings(
        tmp_path, postgres_db_url, f"redis://127.0.0.1:{free_port()}/0", segmenter_model_dir=tmp_path / "no-such-model"
    )
    engine = make_engine(settings.database_url)
    Base.metadata.create_all(engine)
    sessions = make_session_factory(engine)
    seed_database(sessions, storage_dir=settings.storage_dir, phantoms=phantoms)
    with serve(create_app(settings, sessions)) as url:
        response = httpx.get(f"{url}/api/readyz", auth=("alice", PASSWORDS["alice"]), timeout=30)
    engine.dispose()
    assert response.status_code == 503
    checks = {c["name"]: c for c in response.json()["checks"]}
    assert checks["broker"]["status"] == "failed" and "refused" in checks["broker"]["reason"].lower()
    assert checks["segmenter_model"]["status"] == "failed" and "model.json" in checks["segmenter_model"]["reason"]
    assert checks["database"]["status"] == "ok" and checks["disk"]["status"] == "ok"


def test_the_app_refuses_to_start_without_a_secret_outside_development(tmp_path: Path) -> None:
    production = Settings(storage_dir=tmp_path, database_url="postgresql://u@127.0.0.1/db")
    with pytest.raises(security.InsecureSettings, match="GATEKEEPER_WEB_SECRET_KEY"):
        create_app(production)
    with pytest.raises(security.InsecureSettings, match="at least 32"):
        create_app(Settings(storage_dir=tmp_path, database_url="postgresql://u@127.0.0.1/db", web_secret_key="short"))
    assert create_app(Settings(storage_dir=tmp_path)) is not None  # SQLite: development, random key


def test_passwords_are_salted_scrypt_hashes() -> None:
    first, second = security.hash_password("correct horse"), security.hash_password("correct horse")
    assert first != second and first.startswith("scrypt$")
    assert security.verify_password("correct horse", first) and not security.verify_password("wrong horse", first)
    assert not security.verify_password("correct horse", "not-a-hash")
    with pytest.raises(ValueError, match="at least 8"):
        security.hash_password("short")


def test_users_command_adds_lists_and_disables(
    tmp_path: Path, postgres_db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.commands.main import main

    upgrade(postgres_db_url)  # the users commands check that the database is migrated
    engine = make_engine(postgres_db_url)
    monkeypatch.setenv("GATEKEEPER_DATABASE_URL", postgres_db_url)
    monkeypatch.setenv("GATEKEEPER_STORAGE_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        monkeypatch.setattr("sys.stdin", io.StringIO("a-good-password\n"))
        assert main(["users", "add", "carol", "--role", "dosimetrist", "--password-stdin"]) == 0
        monkeypatch.setattr("sys.stdin", io.StringIO("a-good-password\n"))
        assert main(["users", "add", "carol", "--role", "admin", "--password-stdin"]) == 2  # exists
        monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
        assert main(["users", "add", "dave", "--role", "admin", "--password-stdin"]) == 2
        capsys.readouterr()
        assert main(["users", "list"]) == 0
        assert re.search(r"carol\s+dosimetrist\s+yes", capsys.readouterr().out)
        assert main(["users", "disable", "carol"]) == 0
        assert main(["users", "disable", "nobody"]) == 2
        with make_session_factory(engine)() as session:
            from service.web import crud

            assert crud.authenticate(session=session, name="carol", password="a-good-password") is None
            assert main(["users", "enable", "carol"]) == 0
            assert crud.authenticate(session=session, name="carol", password="a-good-password") is not None
        with pytest.raises(SystemExit):
            main(["users", "add", "erin", "--role", "boss", "--password-stdin"])
    finally:
        get_settings.cache_clear()
        engine.dispose()
