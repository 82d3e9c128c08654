"""The worklist's "most informative first" sort over real HTTP (uvicorn) against a real PostgreSQL database.

The flagged item's gate decision says fused 3.1 ÷ threshold 2.0; the geometry item gets a stronger
one (9 ÷ 2) and must come first, then loses it and must come last (no evidence at all).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update
from web_support import (
    ANOMALY,
    PASSWORDS,
    PageClient,
    Seeded,
    login,
    seed_database,
    serve,
    write_model_dir,
    write_phantom,
)

from service.db.session import make_engine, make_session_factory
from service.db.tables import Base, WorklistItem
from service.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def running(tmp_path: Path, postgres_db_url: str, redis_url: str) -> Iterator[tuple[str, Seeded, object]]:
    from service.web.app import create_app

    phantoms = {
        "anomaly": write_phantom(tmp_path / "phantoms", anomaly=ANOMALY, seed=11),
        "geometry": write_phantom(tmp_path / "phantoms", anomaly=None, seed=12),
        "normal": write_phantom(tmp_path / "phantoms", anomaly=None, seed=13),
    }
    settings = Settings(
        storage_dir=tmp_path / "storage",
        database_url=postgres_db_url,
        broker_url=redis_url,
        web_secret_key="s" * 40,
        detector_model_dir=write_model_dir(tmp_path / "detector"),
        segmenter_model_dir=write_model_dir(tmp_path / "segmenter"),
        min_free_disk_bytes=0,
        max_disk_used_fraction=1.0,
    )
    engine = make_engine(settings.database_url)
    Base.metadata.create_all(engine)
    sessions = make_session_factory(engine)
    seeded = seed_database(sessions, storage_dir=settings.storage_dir, phantoms=phantoms)
    with serve(create_app(settings, sessions)) as url:
        yield url, seeded, sessions
    engine.dispose()


def _page_order(client: PageClient, query: str) -> list[int]:
    response = client.get(f"/worklist?{query}")
    assert response.status_code == 200, response.text
    return [int(m) for m in re.findall(r'data-item-id="(\d+)"', response.text)]


def test_worklist_sorts_most_informative_first(running: tuple[str, Seeded, object]) -> None:
    url, seeded, sessions = running
    with PageClient(url, follow_redirects=False, timeout=30) as client:
        assert login(client, "alice").status_code == 303
        page = client.get("/worklist").text
        assert 'id="sort-informative"' in page and "sort=informative&order=desc" in page

        strong = {"gate": {"fused": 9.0, "fused_threshold": 2.0, "findings": []}}
        with sessions.begin() as session:  # type: ignore[attr-defined]
            session.execute(update(WorklistItem).where(WorklistItem.id == seeded.geometry_item).values(detail=strong))
        assert _page_order(client, "sort=informative&order=desc") == [seeded.geometry_item, seeded.flagged_item]

        with sessions.begin() as session:  # type: ignore[attr-defined]
            session.execute(update(WorklistItem).where(WorklistItem.id == seeded.geometry_item).values(detail={}))
        assert _page_order(client, "sort=informative&order=desc") == [seeded.flagged_item, seeded.geometry_item]
        api = PageClient(url, auth=("bob", PASSWORDS["bob"]), timeout=30)
        entries = api.get("/api/worklist", params={"sort": "informative", "order": "desc"}).json()
        assert [e["id"] for e in entries] == [seeded.flagged_item, seeded.geometry_item]
        api.close()
