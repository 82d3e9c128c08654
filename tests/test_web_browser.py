"""One real-browser journey through the worklist: headless Chromium (Debian's package) driven by Playwright.

Log in, see the worklist with the gate's reasons in words, open the flagged series, see the score plot and the heat maps, claim it.
Screenshots go to tests/artifacts/ (git-ignored), kept after the test for a person to look at.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_web import make_settings
from web_support import ANOMALY, GATE_WORDS, PASSWORDS, seed_database, serve, wait_until, write_phantom

from service.db.session import make_engine, make_session_factory
from service.db.tables import Base, WorklistItem
from service.web.app import create_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture
def worklist(tmp_path: Path, postgres_db_url: str, redis_url: str) -> Iterator[tuple[str, object, int]]:
    phantoms = {
        "anomaly": write_phantom(tmp_path / "phantoms", anomaly=ANOMALY, seed=21),
        "geometry": write_phantom(tmp_path / "phantoms", anomaly=None, seed=22),
        "normal": write_phantom(tmp_path / "phantoms", anomaly=None, seed=23),
    }
    settings = make_settings(tmp_path, postgres_db_url, redis_url)
    engine = make_engine(settings.database_url)
    Base.metadata.create_all(engine)
    sessions = make_session_factory(engine)
    seeded = seed_database(sessions, storage_dir=settings.storage_dir, phantoms=phantoms)
    with serve(create_app(settings, sessions)) as url:
        yield url, sessions, seeded.flagged_item
    engine.dispose()


def test_a_dosimetrist_logs_in_opens_a_flagged_series_and_claims_it(worklist: tuple[str, object, int]) -> None:
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is missing: apt-get install chromium (make system-deps)"
    url, sessions, item_id = worklist
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{url}/worklist")
            expect(page).to_have_url(f"{url}/login?next=%2Fworklist")  # anonymous: sent to the login page

            page.fill("input[name=name]", "alice")
            page.fill("input[name=password]", PASSWORDS["alice"])
            page.click("button[type=submit]")
            expect(page).to_have_url(f"{url}/worklist")
            row = page.locator(f"tr[data-item-id='{item_id}']")
            expect(row).to_contain_text("Doe^Jane")
            expect(row).to_contain_text("anomaly")
            expect(row).to_contain_text("5–8")  # flagged slice range
            expect(row.locator("ul.findings li")).to_have_text([GATE_WORDS])  # why, in the gate's words
            page.screenshot(path=str(ARTIFACTS / "worklist.png"), full_page=True)

            row.locator("a.open-series").click()
            expect(page.locator("h1")).to_contain_text("Doe^Jane")
            expect(page.locator("svg.score-plot line.threshold")).to_have_count(1)
            expect(page.locator("section#gate ul.findings")).to_contain_text(GATE_WORDS)
            images = page.locator("figure.slice img")
            expect(images).to_have_count(3)
            wait_until(
                page,
                "[...document.querySelectorAll('figure.slice img')].every(img => img.complete && img.naturalWidth > 64)",
            )

            page.locator("section.worklist-item button.claim").click()
            expect(page.locator("section.worklist-item .status")).to_have_text("claimed")
            expect(page.locator("section.worklist-item")).to_contain_text("by alice")
            expect(page.locator("section.worklist-item button.done")).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "series-claimed.png"), full_page=True)
        finally:
            browser.close()
    print(f"screenshots: {ARTIFACTS / 'worklist.png'} {ARTIFACTS / 'series-claimed.png'}")
    with sessions() as session:  # type: ignore[operator]
        item = session.get(WorklistItem, item_id)
        assert item.status == "claimed"
