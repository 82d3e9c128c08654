"""`gatekeeper feedback list [--json]` as an operator runs it: on a migrated, seeded PostgreSQL database,
and on an un-migrated one (one line, exit code 2)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from alembic import command
from test_cli_database import assert_one_line, run_gatekeeper

from service.db.schema import alembic_config
from service.db.session import make_engine, make_session_factory
from service.db.tables import ContourFeedback, Series, SeriesScore, User, WorklistItem

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 12, 3, 9, 30, tzinfo=dt.UTC)


def seed(url: str) -> dict[str, int]:
    """Two series versions (one worklisted and scored, one auto-routed), a user, three verdicts."""
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            user = User(name="alice", role="dosimetrist", password_hash="x", active=True)
            series = {
                uid: Series(
                    series_instance_uid=uid,
                    version=1,
                    study_instance_uid="1.2.3",
                    modality="CT",
                    calling_ae_title="CT1",
                    state=state,
                    first_received_at=NOW,
                    last_received_at=NOW,
                    route=route,
                    route_reason=reason,
                    geometry_findings=[],
                    patient_name="Doe^Jane",
                )
                for uid, state, route, reason in [
                    ("1.2.3.1", "worklisted", "worklist", "anomaly"),
                    ("1.2.3.2", "delivered", "auto", None),
                ]
            }
            session.add_all([user, *series.values()])
            session.flush()
            item = WorklistItem(series_id=series["1.2.3.1"].id, reason="anomaly", detail={}, created_at=NOW)
            session.add(item)
            session.add(
                SeriesScore(
                    series_id=series["1.2.3.1"].id,
                    model_version="m1",
                    score=0.9,
                    threshold=0.5,
                    flagged=True,
                    slices=[],
                    top_slices=[],
                    provider="CPUExecutionProvider",
                    duration_s=1.0,
                    created_at=NOW,
                )
            )
            session.flush()
            for minutes, uid, verdict, note in [
                (1, "1.2.3.1", "no", "misses the left lobe"),
                (2, "1.2.3.2", "yes", None),
                (3, "1.2.3.1", "not_applicable", None),
            ]:
                session.add(
                    ContourFeedback(
                        series_id=series[uid].id,
                        worklist_item_id=item.id if uid == "1.2.3.1" else None,
                        user_id=user.id,
                        verdict=verdict,
                        note=note,
                        created_at=NOW + dt.timedelta(minutes=minutes),
                    )
                )
            session.commit()
            return {"item": item.id}
    finally:
        engine.dispose()


def test_feedback_list_json_exports_every_verdict_with_the_gate_signals(tmp_path: Path, postgres_db_url: str) -> None:
    command.upgrade(alembic_config(postgres_db_url), "head")
    ids = seed(postgres_db_url)
    result = run_gatekeeper(["feedback", "list", "--json"], database_url=postgres_db_url, storage=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["series_instance_uid"], r["verdict"]) for r in rows] == [
        ("1.2.3.1", "no"),
        ("1.2.3.2", "yes"),
        ("1.2.3.1", "not_applicable"),
    ]
    first = rows[0]
    assert first["user"] == "alice" and first["note"] == "misses the left lobe"
    assert first["created_at"] == "2026-12-03T09:31:00+00:00" and first["worklist_item_id"] == ids["item"]
    assert (first["detector_score"], first["detector_threshold"], first["detector_flagged"]) == (0.9, 0.5, True)
    assert first["route"] == "worklist" and first["worklist_reason"] == "anomaly" and first["geometry_findings"] == 0
    auto = rows[1]
    assert auto["route"] == "auto" and auto["detector_score"] is None and auto["worklist_item_id"] is None
    assert all("Doe" not in json.dumps(r) for r in rows)  # no patient data in the export

    table = run_gatekeeper(["feedback", "list"], database_url=postgres_db_url, storage=tmp_path)
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 4 and "1.80" in table.stdout


def test_feedback_list_on_an_empty_database_says_no_feedback(tmp_path: Path, postgres_db_url: str) -> None:
    command.upgrade(alembic_config(postgres_db_url), "head")
    result = run_gatekeeper(["feedback", "list", "--json"], database_url=postgres_db_url, storage=tmp_path)
    assert result.returncode == 0 and json.loads(result.stdout) == []
    table = run_gatekeeper(["feedback", "list"], database_url=postgres_db_url, storage=tmp_path)
    assert table.stdout.strip() == "no feedback recorded yet"


def test_feedback_list_on_an_unmigrated_database_is_one_line_and_exit_2(tmp_path: Path, postgres_db_url: str) -> None:
    result = run_gatekeeper(["feedback", "list", "--json"], database_url=postgres_db_url, storage=tmp_path)
    assert_one_line(result, "run `gatekeeper db upgrade`")
    assert result.stdout == ""
