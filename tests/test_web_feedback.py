"""Contour feedback and worklist depth over real HTTP (uvicorn) against a real PostgreSQL database.

Covers: recording yes / no / not applicable with a note (a label: the series' state stays), 422 on a
bad verdict or a too-long note, the feedback listed on the series, the audit trail for admins only,
filters by status, reason and age, assignment (admins only; an assigned item is claimed by its
assignee or an admin), the caller's own items first, and the age colour after the configured hours.
"""

from __future__ import annotations

import pytest
import test_web
from sqlalchemy import select
from test_web import Env
from web_support import PASSWORDS, PageClient, login, serve

from service.db.tables import AuditEvent, ContourFeedback, Series
from service.web.app import create_app

pytestmark = pytest.mark.integration

# The seeded worklist of test_web: the same users, series and items.
phantoms = test_web.phantoms
env = test_web.env


def series_state(env: Env, uid: str) -> str:
    with env.sessions() as session:
        return str(session.scalar(select(Series.state).where(Series.series_instance_uid == uid)))


def test_feedback_yes_no_and_not_applicable_are_recorded_with_user_time_and_note(env: Env) -> None:
    flagged, geometry = env.seeded.flagged_uid, env.seeded.geometry_uid
    yes = env.client("alice").post(f"/api/series/{flagged}/feedback", json={"verdict": "yes", "note": "  fine  "})
    assert yes.status_code == 201, yes.text
    body = yes.json()
    assert body["verdict"] == "yes" and body["note"] == "fine" and body["user"] == "alice"
    assert body["series_version"] == 1 and body["worklist_item_id"] == env.seeded.flagged_item
    no = env.client("bob").post(f"/api/series/{flagged}/feedback", json={"verdict": "no"})
    assert no.status_code == 201 and no.json()["note"] is None
    na = env.client("bob").post(f"/api/series/{geometry}/feedback", json={"verdict": "not_applicable", "note": "gap"})
    assert na.status_code == 201
    # On the auto-routed (delivered) series too: what a shadow review records.
    assert (
        env.client("bob").post(f"/api/series/{env.seeded.delivered_uid}/feedback", json={"verdict": "yes"}).is_success
    )

    listed = env.client("alice").get(f"/api/series/{flagged}").json()["feedback"]
    assert [(f["user"], f["verdict"]) for f in listed] == [("bob", "no"), ("alice", "yes")]  # newest first
    assert listed[0]["created_at"] >= listed[1]["created_at"]
    # A label, not a lifecycle step: the series stays where it was.
    assert series_state(env, flagged) == "worklisted" and series_state(env, geometry) == "worklisted"
    assert series_state(env, env.seeded.delivered_uid) == "delivered"
    with env.sessions() as session:
        assert len(session.scalars(select(ContourFeedback)).all()) == 4


def test_a_bad_verdict_or_a_too_long_note_is_422(env: Env) -> None:
    uid = env.seeded.flagged_uid
    client = env.client("alice")
    assert client.post(f"/api/series/{uid}/feedback", json={"verdict": "maybe"}).status_code == 422
    assert client.post(f"/api/series/{uid}/feedback", json={}).status_code == 422
    assert client.post(f"/api/series/{uid}/feedback", json={"verdict": "no", "note": "x" * 2001}).status_code == 422
    assert client.post("/api/series/1.2.3.no.such/feedback", json={"verdict": "no"}).status_code == 404
    with env.client() as browser:
        browser.post("/login", data={"name": "alice", "password": PASSWORDS["alice"]})
        assert browser.post(f"/series/{uid}/feedback", data={"verdict": "perhaps", "version": "1"}).status_code == 422
    with env.sessions() as session:
        assert session.scalars(select(ContourFeedback)).all() == []


def test_the_feedback_form_records_and_shows_the_verdict_on_the_series_page(env: Env) -> None:
    uid = env.seeded.flagged_uid
    with env.client() as browser:
        browser.post("/login", data={"name": "alice", "password": PASSWORDS["alice"]})
        page = browser.get(f"/series/{uid}")
        assert 'class="feedback-form"' in page.text and "No feedback recorded" in page.text
        posted = browser.post(
            f"/series/{uid}/feedback", data={"verdict": "no", "note": "misses segment 7", "version": "1"}
        )
        assert posted.status_code == 303 and posted.headers["location"].endswith("?version=1#feedback")
        page = browser.get(f"/series/{uid}", params={"version": 1})
        assert "misses segment 7" in page.text and 'class="verdict-no"' in page.text


def test_the_audit_trail_is_for_admins_only_and_names_who_did_what(env: Env) -> None:
    item = env.seeded.flagged_item
    assert env.client("alice").post(f"/api/worklist/{item}/claim").status_code == 200
    assert env.client("alice").post(f"/api/worklist/{item}/release").status_code == 200
    env.client("bob").post(f"/api/series/{env.seeded.flagged_uid}/feedback", json={"verdict": "no", "note": "secret"})

    refused = env.client("alice").get("/api/audit")
    assert refused.status_code == 403 and "admin" in refused.json()["detail"]
    with env.client() as browser:
        browser.post("/login", data={"name": "bob", "password": PASSWORDS["bob"]})
        assert browser.get("/audit").status_code == 403
        assert 'href="/audit"' not in browser.get("/worklist").text

    lines = env.client("admin").get("/api/audit").json()
    assert [(a["user"], a["action"]) for a in lines] == [("bob", "feedback"), ("alice", "release"), ("alice", "claim")]
    assert all(a["worklist_item_id"] == item and a["series_instance_uid"] == env.seeded.flagged_uid for a in lines)
    assert lines[0]["detail"] == {"verdict": "no", "note": True}  # the note itself stays out of the audit
    with env.client() as browser:
        browser.post("/login", data={"name": "admin", "password": PASSWORDS["admin"]})
        page = browser.get("/audit")
        assert page.status_code == 200 and page.text.count('class="action-') == 3 and "secret" not in page.text
        assert 'href="/audit"' in browser.get("/worklist").text


def test_filters_by_status_reason_and_age(env: Env) -> None:
    client = env.client("bob")

    def ids(**params: object) -> list[int]:
        response = client.get("/api/worklist", params=params)
        assert response.status_code == 200, response.text
        return [e["id"] for e in response.json()]

    flagged, geometry = env.seeded.flagged_item, env.seeded.geometry_item  # 2 h and 20 min on the worklist
    assert ids(reason="geometry") == [geometry]
    assert ids(reason="anomaly,geometry") == [flagged, geometry]
    assert ids(reason="no_liver") == []
    assert ids(older_than_h=1) == [flagged]
    assert ids(older_than_h=0.1) == [flagged, geometry]
    client.post(f"/api/worklist/{geometry}/claim")
    assert ids(status="claimed") == [geometry] and ids(status="open") == [flagged]
    assert ids(status="claimed", reason="anomaly") == []
    assert client.get("/api/worklist", params={"reason": "boredom"}).status_code == 400
    assert client.get("/api/worklist", params={"older_than_h": -1}).status_code == 422
    with env.client() as browser:
        browser.post("/login", data={"name": "bob", "password": PASSWORDS["bob"]})
        page = browser.get("/worklist", params={"reason": "anomaly", "older_than_h": "1", "status": "active"})
        assert f'data-item-id="{flagged}"' in page.text and f'data-item-id="{geometry}"' not in page.text
        assert "reason=anomaly" in page.text  # the sort links keep the filters
        assert browser.get("/worklist", params={"older_than_h": "soon"}).status_code == 400


def test_only_an_admin_assigns_and_then_only_the_assignee_or_an_admin_claims(env: Env) -> None:
    item = env.seeded.flagged_item
    refused = env.client("alice").post(f"/api/worklist/{item}/assign", json={"assignee": "alice"})
    assert refused.status_code == 403 and "admin" in refused.json()["detail"]

    assigned = env.client("admin").post(f"/api/worklist/{item}/assign", json={"assignee": "bob"})
    assert assigned.status_code == 200 and assigned.json()["assigned_to"] == "bob" and assigned.json()["assigned_at"]
    assert assigned.json()["status"] == "open"  # an attribute, not a state change
    assert series_state(env, env.seeded.flagged_uid) == "worklisted"
    assert env.client("admin").post(f"/api/worklist/{item}/assign", json={"assignee": "nobody"}).status_code == 404

    conflict = env.client("alice").post(f"/api/worklist/{item}/claim")
    assert conflict.status_code == 409 and "assigned to bob" in conflict.json()["detail"]
    claimed = env.client("bob").post(f"/api/worklist/{item}/claim")
    assert claimed.status_code == 200 and claimed.json()["claimed_by"] == "bob"

    unassigned = env.client("admin").post(f"/api/worklist/{item}/assign", json={"assignee": None})
    assert unassigned.json()["assigned_to"] is None and unassigned.json()["claimed_by"] == "bob"
    with env.sessions() as session:
        actions = session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all()
    assert actions == ["assign", "claim", "unassign"]

    with env.client() as browser:  # the form, as the admin's worklist page posts it
        browser.post("/login", data={"name": "admin", "password": PASSWORDS["admin"]})
        geometry = env.seeded.geometry_item
        page = browser.get("/worklist")
        assert f'action="/worklist/{geometry}/assign"' in page.text
        posted = browser.post(f"/worklist/{geometry}/assign", data={"assignee": "alice", "next": "/worklist"})
        assert posted.status_code == 303 and posted.headers["location"] == "/worklist"
        assert "assigned to alice" in browser.get("/worklist").text
    with env.client() as browser:
        browser.post("/login", data={"name": "bob", "password": PASSWORDS["bob"]})
        assert f'action="/worklist/{geometry}/assign"' not in browser.get("/worklist").text
        assert browser.post(f"/worklist/{geometry}/assign", data={"assignee": "bob"}).status_code == 403


def test_items_claimed_by_or_assigned_to_the_user_come_first_for_them(env: Env) -> None:
    flagged, geometry = env.seeded.flagged_item, env.seeded.geometry_item
    assert [e["id"] for e in env.client("alice").get("/api/worklist").json()] == [flagged, geometry]  # oldest first
    env.client("alice").post(f"/api/worklist/{geometry}/claim")
    assert [e["id"] for e in env.client("alice").get("/api/worklist").json()] == [geometry, flagged]
    assert [e["id"] for e in env.client("bob").get("/api/worklist").json()] == [flagged, geometry]

    env.client("admin").post(f"/api/worklist/{geometry}/release")
    env.client("admin").post(f"/api/worklist/{geometry}/assign", json={"assignee": "bob"})
    assert [e["id"] for e in env.client("bob").get("/api/worklist").json()] == [geometry, flagged]
    assert [e["id"] for e in env.client("alice").get("/api/worklist").json()] == [flagged, geometry]
    with env.client() as browser:
        browser.post("/login", data={"name": "bob", "password": PASSWORDS["bob"]})
        text = browser.get("/worklist").text
        assert text.index(f'data-item-id="{geometry}"') < text.index(f'data-item-id="{flagged}"')
        assert "status-open mine" in text


def test_items_waiting_longer_than_the_setting_get_the_age_colour(env: Env) -> None:
    flagged, geometry = env.seeded.flagged_item, env.seeded.geometry_item  # 2 h and 20 min

    def warned(url: str) -> dict[int, bool]:
        with PageClient(url, timeout=30) as browser:
            login(browser, "alice")
            text = browser.get("/worklist").text
        return {item: f'age-warning" data-item-id="{item}"' in text for item in (flagged, geometry)}

    assert warned(env.url) == {flagged: False, geometry: False}  # default 24 h
    settings = env.app.state.settings.model_copy(update={"worklist_age_warning_h": 1.0})
    with serve(create_app(settings, env.sessions)) as url:
        assert warned(url) == {flagged: True, geometry: False}
