"""Real-browser journeys through feedback, filters and assignment: headless Chromium (Debian's package)
driven by Playwright.

A dosimetrist records a verdict on the auto contour and filters the worklist by reason; an admin
assigns an item and reads the audit trail. Screenshots go to tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from test_web import make_settings
from web_support import ANOMALY, PASSWORDS, Seeded, seed_database, serve, write_phantom

from service.db.session import make_engine, make_session_factory
from service.db.tables import Base, ContourFeedback, Series, User, WorklistItem
from service.web.app import create_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture
def worklist(tmp_path: Path, postgres_db_url: str, redis_url: str) -> Iterator[tuple[str, Any, Seeded]]:
    phantoms = {
        "anomaly": write_phantom(tmp_path / "phantoms", anomaly=ANOMALY, seed=31),
        "geometry": write_phantom(tmp_path / "phantoms", anomaly=None, seed=32),
        "normal": write_phantom(tmp_path / "phantoms", anomaly=None, seed=33),
    }
    settings = make_settings(tmp_path, postgres_db_url, redis_url, worklist_age_warning_h=1.0)
    engine = make_engine(settings.database_url)
    Base.metadata.create_all(engine)
    sessions = make_session_factory(engine)
    seeded = seed_database(sessions, storage_dir=settings.storage_dir, phantoms=phantoms)
    with serve(create_app(settings, sessions)) as url:
        yield url, sessions, seeded
    engine.dispose()


def log_in(page: Any, url: str, name: str) -> None:
    page.goto(f"{url}/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORDS[name])
    page.click("button[type=submit]")


def test_a_dosimetrist_records_feedback_filters_and_an_admin_assigns(worklist: tuple[str, Any, Seeded]) -> None:
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is missing: apt-get install chromium (make system-deps)"
    url, sessions, seeded = worklist
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            # A dosimetrist: feedback on the flagged series.
            alice = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
            log_in(alice, url, "alice")
            expect(alice).to_have_url(f"{url}/worklist")
            flagged_row = alice.locator(f"tr[data-item-id='{seeded.flagged_item}']")
            expect(flagged_row).to_have_class("status-open age-warning")  # 2 h on the worklist, warning after 1 h
            flagged_row.locator("a.open-series").click()
            expect(alice.locator("h1")).to_contain_text("Doe^Jane")
            feedback = alice.locator("section.feedback")
            feedback.locator("input[name=verdict][value=no]").check()
            feedback.locator("textarea[name=note]").fill("misses the caudate lobe")
            feedback.locator("button.record-feedback").click()
            expect(alice.locator("table.feedback-list tr.verdict-no")).to_contain_text("misses the caudate lobe")
            expect(alice.locator("table.feedback-list tr.verdict-no")).to_contain_text("alice")
            expect(alice.locator("dd.state")).to_have_text("worklisted")  # a label, not a state change
            alice.screenshot(path=str(ARTIFACTS / "series-feedback.png"), full_page=True)

            # Filter the worklist by reason with the filter form.
            alice.goto(f"{url}/worklist")
            alice.select_option("#worklist-filters select[name=reason]", "geometry")
            alice.click("#worklist-filters button.filter")
            expect(alice).to_have_url(f"{url}/worklist?sort=age&order=desc&status=active&reason=geometry&older_than_h=")
            expect(alice.locator("table.worklist tbody tr")).to_have_count(1)
            expect(alice.locator(f"tr[data-item-id='{seeded.geometry_item}']")).to_contain_text("Roe^Richard")
            alice.fill("#worklist-filters input[name=older_than_h]", "1")
            alice.click("#worklist-filters button.filter")
            expect(alice.locator("p.empty")).to_contain_text("matches these filters")  # geometry: 20 min only
            alice.screenshot(path=str(ARTIFACTS / "worklist-filtered.png"), full_page=True)

            # An admin assigns the flagged item to bob; alice then sees it assigned, bob sees it first.
            admin = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
            log_in(admin, url, "admin")
            row = admin.locator(f"tr[data-item-id='{seeded.flagged_item}']")
            row.locator("select[name=assignee]").select_option("bob")
            row.locator("button.assign").click()
            expect(admin.locator(f"tr[data-item-id='{seeded.flagged_item}'] .assigned")).to_have_text("assigned to bob")
            admin.screenshot(path=str(ARTIFACTS / "worklist-assigned.png"), full_page=True)
            admin.click("header.top a[href='/audit']")
            expect(admin.locator("table.audit tbody tr")).to_have_count(2)
            expect(admin.locator("table.audit tbody tr").first).to_contain_text("assign")
            expect(admin.locator("table.audit tbody tr").nth(1)).to_contain_text("feedback")
            admin.screenshot(path=str(ARTIFACTS / "audit.png"), full_page=True)

            alice.goto(f"{url}/worklist")
            expect(alice.locator(f"tr[data-item-id='{seeded.flagged_item}'] .actions")).to_contain_text(
                "assigned to bob"
            )
            expect(alice.locator(f"tr[data-item-id='{seeded.flagged_item}'] button.claim")).to_have_count(0)
        finally:
            browser.close()
    with sessions() as session:
        item = session.get(WorklistItem, seeded.flagged_item)
        bob = session.scalar(select(User).where(User.name == "bob"))
        assert item.assigned_to == bob.id and item.status == "open"
        verdicts = session.scalars(select(ContourFeedback.verdict)).all()
        assert verdicts == ["no"]
        assert session.scalar(select(Series.state).where(Series.id == item.series_id)) == "worklisted"
