"""`gatekeeper feedback list [--json]` and `gatekeeper evaluate gate --feedback` as an operator runs them:
on a migrated, seeded PostgreSQL database, and on an un-migrated one (one line, exit code 2); the
per-signal report on hand-made labels."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pytest
from alembic import command
from test_cli_database import assert_one_line, run_gatekeeper

from models.segmenter.evaluate_gate_feedback import feedback_report, feedback_summary
from service.db.schema import alembic_config
from service.db.session import make_engine, make_session_factory
from service.db.tables import ContourFeedback, Series, SeriesScore, User, WorklistItem
from service.feedback import FeedbackLabel

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


@pytest.mark.integration
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


@pytest.mark.integration
def test_feedback_list_on_an_empty_database_says_no_feedback(tmp_path: Path, postgres_db_url: str) -> None:
    command.upgrade(alembic_config(postgres_db_url), "head")
    result = run_gatekeeper(["feedback", "list", "--json"], database_url=postgres_db_url, storage=tmp_path)
    assert result.returncode == 0 and json.loads(result.stdout) == []
    table = run_gatekeeper(["feedback", "list"], database_url=postgres_db_url, storage=tmp_path)
    assert table.stdout.strip() == "no feedback recorded yet"


@pytest.mark.integration
def test_feedback_list_on_an_unmigrated_database_is_one_line_and_exit_2(tmp_path: Path, postgres_db_url: str) -> None:
    result = run_gatekeeper(["feedback", "list", "--json"], database_url=postgres_db_url, storage=tmp_path)
    assert_one_line(result, "run `gatekeeper db upgrade`")
    assert result.stdout == ""


@pytest.mark.integration
def test_evaluate_gate_feedback_reads_the_verdicts_of_the_database(tmp_path: Path, postgres_db_url: str) -> None:
    command.upgrade(alembic_config(postgres_db_url), "head")
    empty = run_gatekeeper(["evaluate", "gate", "--feedback"], database_url=postgres_db_url, storage=tmp_path)
    assert empty.returncode == 0 and empty.stdout.startswith("no feedback recorded yet"), empty.stderr
    seed(postgres_db_url)
    out = tmp_path / "report"
    result = run_gatekeeper(
        ["evaluate", "gate", "--feedback", "--out", str(out)], database_url=postgres_db_url, storage=tmp_path
    )
    assert result.returncode == 0, result.stderr
    # 1.2.3.1: no, then not applicable (the newest counts: left out); 1.2.3.2: yes.
    assert "3 verdicts on 2 series versions" in result.stdout and "0 no (failure), 1 yes" in result.stdout
    assert "AUROC needs both" in result.stdout
    report = json.loads((out / "feedback_report.json").read_text())
    routed = report["signals"]["routed_to_worklist"]
    assert (routed["series"], routed["no"], routed["yes"], routed["stopped_yes"]) == (1, 0, 1, 0)
    assert math.isnan(routed["auroc_no"])  # one class only: no AUROC


def test_an_unmigrated_database_stops_evaluate_gate_feedback_with_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    result = run_gatekeeper(["evaluate", "gate", "--feedback"], database_url=url, storage=tmp_path)
    assert_one_line(result, "run `gatekeeper db upgrade`")


def label(n: int, verdict: str, *, score: float | None, route: str = "worklist", minute: int = 0) -> FeedbackLabel:
    return FeedbackLabel(
        id=n * 10 + minute,
        created_at=NOW + dt.timedelta(minutes=minute),
        user="alice",
        verdict=verdict,
        note=None,
        series_id=n,
        series_instance_uid=f"1.2.{n}",
        series_version=1,
        worklist_item_id=None,
        route=route,
        route_reason=None,
        worklist_reason=None,
        detector_model_version="m1" if score is not None else None,
        detector_score=score,
        detector_threshold=0.5 if score is not None else None,
        detector_flagged=score > 0.5 if score is not None else None,
        geometry_findings=0,
    )


def test_feedback_report_gives_auroc_per_signal_with_no_as_the_failure() -> None:
    labels = [
        label(1, "no", score=0.9),
        label(2, "no", score=0.4, route="auto"),  # a failure the gate let through
        label(3, "yes", score=0.2, route="auto"),
        label(4, "yes", score=0.6),  # stopped though it would have been fine
        label(5, "yes", score=None, route="worklist"),  # unreadable: no score
        label(6, "no", score=0.3, route="auto"),
        label(6, "not_applicable", score=0.3, route="auto", minute=5),  # the newest verdict counts
    ]
    report = feedback_report(labels)
    assert (report["verdicts"], report["series"], report["no"], report["yes"], report["not_applicable"]) == (
        7,
        6,
        2,
        3,
        1,
    )
    score = report["signals"]["detector_score"]
    assert (score["series"], score["no"], score["yes"]) == (4, 2, 2)
    # no: 1.8, 0.8; yes: 0.4, 1.2 → pairs (no > yes): 1.8>0.4, 1.8>1.2, 0.8>0.4 = 3 of 4
    assert score["auroc_no"] == pytest.approx(0.75)
    flagged = report["signals"]["detector_flagged"]
    assert (flagged["stopped_no"], flagged["stopped_yes"]) == (1, 1)
    routed = report["signals"]["routed_to_worklist"]
    assert (routed["series"], routed["stopped_no"], routed["no"], routed["stopped_yes"], routed["yes"]) == (
        5,
        1,
        2,
        2,
        3,
    )
    assert routed["auroc_no"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert report["signals"]["geometry_findings"]["auroc_no"] == 0.5  # no findings anywhere: no information
    text = feedback_summary(report)
    assert "2 no (failure), 3 yes, 1 not applicable" in text and "0.750" in text


def test_feedback_report_without_both_verdicts_has_no_auroc() -> None:
    report = feedback_report([label(1, "no", score=0.9)])
    assert math.isnan(report["signals"]["detector_score"]["auroc_no"])
    assert "AUROC needs both" in feedback_summary(report)
    assert feedback_summary(feedback_report([])).startswith("no feedback recorded yet")
