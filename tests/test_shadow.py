"""Shadow mode (`GATEKEEPER_MODE=shadow`, service/shadow.py): everything processed, nothing sent.

- End to end with real peers: the listener, a Celery worker in its own process (Redis), PostgreSQL
  and Orthanc as the PACS; storescu sends a normal and a hip-prosthesis series. The normal one ends
  `withheld` with its SEG kept and a shadow-review worklist item; the one the gate stops on the
  worklist with the segmenter's draft SEG for its reviewer; Orthanc holds nothing and no export is recorded.
- The share of shadow reviews: chosen by a hash of the Series Instance UID, the same every time.
- The agreement table and its bootstrap CIs on known counts; `gatekeeper report shadow [--json]`
  on a seeded set of answers.
- The worklist page shows a shadow review with its question and takes yes / no.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_web
from ingest_support import (
    Db,
    ct_files,
    gatekeeper_executable,
    make_settings,
    running_listener,
    storescu,
    upgrade,
    wait_for,
)
from sqlalchemy import select
from test_e2e_pipeline import phantom, process, series_uid
from test_pacs_export import orthanc
from test_web import Env
from web_support import ANOMALY, PASSWORDS, add_series, write_phantom

from service import pipeline
from service.db.tables import (
    ContourFeedback,
    Export,
    Route,
    RouteReason,
    Series,
    SeriesEvent,
    User,
    WorklistItem,
    WorklistStatus,
)
from service.dicom_send import ExportNotConfiguredError, forward_destination, pacs_destination
from service.lifecycle import SeriesState
from service.settings import Settings, get_settings
from service.shadow import SHADOW_REVIEW_QUESTION, agreement_table, selected_for_shadow_review

NOW = dt.datetime(2026, 12, 3, 9, 30, tzinfo=dt.UTC)


# --- the share of shadow reviews ------------------------------------------------------------------


def test_the_shadow_review_share_is_honoured_and_the_same_series_is_always_chosen() -> None:
    uids = [f"1.2.826.0.1.3680043.10.543.{i}" for i in range(4000)]
    chosen = [uid for uid in uids if selected_for_shadow_review(uid, 0.2)]
    assert 0.18 <= len(chosen) / len(uids) <= 0.22
    assert chosen == [uid for uid in uids if selected_for_shadow_review(uid, 0.2)]  # deterministic
    # Raising the share keeps every series chosen before; 0 and 1 choose none and all.
    assert set(chosen) < {uid for uid in uids if selected_for_shadow_review(uid, 0.5)}
    assert not any(selected_for_shadow_review(uid, 0.0) for uid in uids[:200])
    assert all(selected_for_shadow_review(uid, 1.0) for uid in uids[:200])
    with pytest.raises(ValueError, match="from 0 to 1"):
        selected_for_shadow_review(uids[0], 1.5)


def _segmenting_series(db: Db, uids: list[str]) -> dict[str, int]:
    with db.sessions.begin() as session:
        rows = {
            uid: Series(
                series_instance_uid=uid,
                version=1,
                study_instance_uid="1.2.3",
                modality="CT",
                calling_ae_title="CT1",
                state=SeriesState.SEGMENTING.value,
                first_received_at=NOW,
                last_received_at=NOW,
                route=Route.AUTO.value,
            )
            for uid in uids
        }
        session.add_all(rows.values())
        session.flush()
        return {uid: row.id for uid, row in rows.items()}


def test_withhold_puts_exactly_the_chosen_share_on_the_worklist_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shadow.db'}"
    upgrade(url)
    db = Db(url)
    settings = Settings(storage_dir=tmp_path, database_url=url, mode="shadow", shadow_review_share=0.5)
    ids = _segmenting_series(db, [f"1.2.826.0.1.3680043.10.544.{i}" for i in range(24)])
    for uid, series_id in ids.items():
        assert pipeline.withhold(
            sessions=db.sessions,
            settings=settings,
            series_id=series_id,
            series_instance_uid=uid,
            review=True,
            detail={"files": []},
        )
        # A duplicate message changes nothing.
        assert not pipeline.withhold(
            sessions=db.sessions,
            settings=settings,
            series_id=series_id,
            series_instance_uid=uid,
            review=True,
            detail={"files": []},
        )
    expected = {ids[uid] for uid in ids if selected_for_shadow_review(uid, 0.5)}
    with db.sessions() as session:
        items = session.scalars(select(WorklistItem)).all()
        states = set(session.scalars(select(Series.state)))
        reviewed = {
            e.series_id: e.detail["shadow_review"]
            for e in session.scalars(select(SeriesEvent).where(SeriesEvent.kind == "withheld"))
        }
    assert 0 < len(expected) < len(ids)
    assert {i.series_id for i in items} == expected and len(items) == len(expected)
    assert {(i.reason, i.status, i.detail["question"]) for i in items} == {
        ("shadow_review", "open", SHADOW_REVIEW_QUESTION)
    }
    assert states == {"withheld"}
    assert {sid for sid, chosen in reviewed.items() if chosen} == expected and len(reviewed) == len(ids)
    db.close()


def test_shadow_mode_refuses_every_destination(tmp_path: Path) -> None:
    settings = Settings(
        storage_dir=tmp_path,
        mode="SHADOW",
        pacs_host="127.0.0.1",
        pacs_ae_title="PACS",
        forward_host="127.0.0.1",
        forward_ae_title="NODE",
    )
    assert settings.mode == "shadow"
    for destination in (pacs_destination, forward_destination):
        with pytest.raises(ExportNotConfiguredError, match="shadow mode"):
            destination(settings)
    live = settings.model_copy(update={"mode": "live"})
    assert str(pacs_destination(live)) == "PACS@127.0.0.1:104"


# --- end to end: nothing reaches the PACS ---------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_shadow_mode_processes_every_series_and_the_pacs_receives_nothing(
    tmp_path: Path, postgres_db_url: str, redis_url: str
) -> None:
    upgrade(postgres_db_url)
    normal = phantom(tmp_path / "normal", anomaly="none", seed=5, slices=20)
    hip = phantom(tmp_path / "hip", anomaly="hip_prosthesis", seed=6, slices=20)
    db = Db(postgres_db_url)

    def states() -> dict[str, str]:
        return {s.series_instance_uid: s.state for s in db.series()}

    with orthanc(tmp_path / "orthanc") as pacs:
        pacs.start()
        settings = make_settings(
            tmp_path / "var",
            postgres_db_url,
            redis_url,
            quiet_period_s=1.0,
            pacs_host="127.0.0.1",
            pacs_port=pacs.dicom_port,
            pacs_ae_title="ORTHANC",
            export_queue=f"test.export.{tmp_path.name}",
            pipeline_sweep_interval_s=1,
            mode="shadow",
            shadow_review_share=1.0,  # every auto-routed series is reviewed (the share itself: tests above)
        )
        with (
            running_listener(settings) as listener,
            process([gatekeeper_executable(), "worker"], settings, tmp_path / "worker.log"),
        ):
            for folder in (normal, hip):
                sent = storescu(listener.port, ct_files(folder))
                assert sent.returncode == 0, sent.stdout[-2000:] + sent.stderr[-2000:]
            expected = {series_uid(normal): SeriesState.WITHHELD, series_uid(hip): SeriesState.WORKLISTED}
            wait_for(lambda: states() == expected, timeout=240, interval=0.5)
        [hip_row] = db.series(series_uid(hip))
        [normal_row] = db.series(series_uid(normal))
        assert pacs.rest("/instances") == [] and pacs.rest("/statistics")["CountInstances"] == 0

    with db.sessions() as session:
        assert session.scalars(select(Export)).all() == []
        items = {i.series_id: i for i in session.scalars(select(WorklistItem))}
        withheld = session.scalars(
            select(SeriesEvent).where(SeriesEvent.series_id == normal_row.id, SeriesEvent.kind == "withheld")
        ).one()
    # The auto-routed series: segmented, its SEG kept, on the worklist for a shadow review.
    assert normal_row.route == "auto" and withheld.detail["mode"] == "shadow" and withheld.detail["shadow_review"]
    [seg_file] = withheld.detail["files"]
    assert (settings.storage_dir / seg_file).is_file() and "liver-seg-" in seg_file
    assert (items[normal_row.id].reason, items[normal_row.id].status) == ("shadow_review", "open")
    # The series the gate stopped: on the worklist as in live mode, with the segmenter's draft for its reviewer.
    hip_item = items[hip_row.id]
    assert (hip_row.route, hip_row.route_reason, hip_item.reason) == ("worklist", "anomaly", "anomaly")
    assert (settings.storage_dir / hip_item.detail["draft"]).is_file() and "liver-seg-draft-" in hip_item.detail[
        "draft"
    ]
    assert any(f["fired"] and f["words"] for f in hip_item.detail["gate"]["findings"])
    assert db.event_kinds(hip_row.id)[-2:] == ["segmenting", "routed"]
    logs = (tmp_path / "worker.log").read_text()
    assert "withheld (shadow mode)" in logs and normal_row.patient_name and normal_row.patient_name not in logs
    for name in (settings.score_queue, settings.segment_queue, settings.export_queue, settings.pipeline_queue):
        __import__("redis").Redis.from_url(redis_url).delete(name)
    db.close()


# --- the agreement table and the report -----------------------------------------------------------


def test_the_agreement_table_counts_pairs_and_gives_seeded_bootstrap_cis() -> None:
    # 40 auto & acceptable, 5 auto & not, 10 worklist & acceptable, 15 worklist & not.
    gate_manual = [False] * 45 + [True] * 25
    not_acceptable = [False] * 40 + [True] * 5 + [False] * 10 + [True] * 15
    table = agreement_table(gate_manual, not_acceptable, resamples=1000, seed=3)
    assert (table.auto_yes, table.auto_no, table.manual_yes, table.manual_no, table.n) == (40, 5, 10, 15, 70)
    assert table.agreement.value == round(55 / 70, 4) and (table.agreement.numerator, table.agreement.denominator) == (
        55,
        70,
    )
    assert table.sensitivity.value == 0.75 and table.specificity.value == 0.8
    for estimate in (table.agreement, table.sensitivity, table.specificity):
        assert estimate.ci95 is not None
        low, high = estimate.ci95
        assert 0 <= low < estimate.value < high <= 1
    # Sensitivity rests on 20 cases, specificity on 50: its interval is wider.
    assert table.sensitivity.ci95[1] - table.sensitivity.ci95[0] > table.specificity.ci95[1] - table.specificity.ci95[0]
    assert agreement_table(gate_manual, not_acceptable, resamples=1000, seed=3) == table  # seeded
    assert agreement_table(gate_manual, not_acceptable, resamples=1000, seed=4).agreement.ci95 != table.agreement.ci95
    # A gate that never stops anything: sensitivity 0, specificity 1; no cases: nothing defined.
    never = agreement_table([False] * 10, [True] * 3 + [False] * 7, resamples=200)
    assert never.sensitivity.value == 0.0 and never.specificity.value == 1.0 and never.sensitivity.ci95 == (0.0, 0.0)
    empty = agreement_table([], [], resamples=10)
    assert empty.n == 0 and empty.agreement.value is None and empty.agreement.ci95 is None
    with pytest.raises(ValueError, match="expected the same"):
        agreement_table([True], [True, False])


def seed_answers(url: str) -> None:
    """Series versions with the gate's route and the reviewers' answers (a later answer corrects an earlier one).

    The newest answers: auto yes ×3, auto no ×1, worklist (anomaly) no ×2, worklist (geometry) yes ×1,
    one not applicable; one auto series answered no, then yes (counts as yes).
    """
    db = Db(url)
    cases = [
        # (route, reason, worklist reason, answers oldest first)
        ("auto", None, "shadow_review", ["yes"]),
        ("auto", None, "shadow_review", ["no", "yes"]),
        ("auto", None, None, ["yes"]),
        ("auto", None, "shadow_review", ["no"]),
        ("worklist", "anomaly", "anomaly", ["no"]),
        ("worklist", "anomaly", "anomaly", ["yes", "no"]),
        ("worklist", "geometry", "geometry", ["yes"]),
        ("worklist", "anomaly", "anomaly", ["not_applicable"]),
    ]
    with db.sessions.begin() as session:
        user = User(name="alice", role="dosimetrist", password_hash="x", active=True)
        session.add(user)
        session.flush()
        minute = 0
        for i, (route, reason, item_reason, answers) in enumerate(cases):
            series = Series(
                series_instance_uid=f"1.2.826.0.1.3680043.10.545.{i}",
                version=1,
                study_instance_uid="1.2.3",
                modality="CT",
                calling_ae_title="CT1",
                state="withheld" if route == "auto" else "worklisted",
                first_received_at=NOW,
                last_received_at=NOW,
                route=route,
                route_reason=reason,
                patient_name="Doe^Jane",
            )
            session.add(series)
            session.flush()
            item = None
            if item_reason:
                item = WorklistItem(series_id=series.id, reason=item_reason, detail={}, created_at=NOW)
                session.add(item)
                session.flush()
            for verdict in answers:
                minute += 1
                session.add(
                    ContourFeedback(
                        series_id=series.id,
                        worklist_item_id=item.id if item else None,
                        user_id=user.id,
                        verdict=verdict,
                        created_at=NOW + dt.timedelta(minutes=minute),
                    )
                )
    db.close()


def run_report(
    args: list[str], url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], storage: Path
) -> tuple[int, str, str]:
    """`gatekeeper report shadow ARGS` in this process, on the database at `url`: (exit code, stdout, stderr)."""
    from service.commands.main import main

    monkeypatch.setenv("GATEKEEPER_DATABASE_URL", url)
    monkeypatch.setenv("GATEKEEPER_STORAGE_DIR", str(storage))
    get_settings.cache_clear()
    try:
        code = main(["report", "shadow", *args])
    finally:
        get_settings.cache_clear()
    out, err = capsys.readouterr()
    return code, out, err


def test_report_shadow_json_prints_the_agreement_table_of_the_seeded_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'report.db'}"
    upgrade(url)
    seed_answers(url)
    code, out, err = run_report(["--json", "--resamples", "500"], url, monkeypatch, capsys, tmp_path)
    assert code == 0, err
    report = json.loads(out)
    assert report["counts"] == {"auto_yes": 3, "auto_no": 1, "manual_yes": 1, "manual_no": 2}
    assert report["n"] == 7 and report["not_applicable"] == 1 and report["unrouted"] == 0
    assert report["agreement"]["value"] == round(5 / 7, 4)
    assert report["sensitivity"]["value"] == round(2 / 3, 4) and report["sensitivity"]["denominator"] == 3
    assert report["specificity"]["value"] == 0.75 and report["specificity"]["denominator"] == 4
    low, high = report["agreement"]["ci95"]
    assert 0 <= low < 5 / 7 < high <= 1
    assert report["manual_by_reason"] == {"anomaly": 2, "geometry": 1} and report["shadow_reviews"] == 3
    assert report["bootstrap"] == {"resamples": 500, "seed": 0}
    assert "Doe" not in out

    code, out, err = run_report([], url, monkeypatch, capsys, tmp_path)
    assert code == 0, err
    [sensitivity] = [line.split() for line in out.splitlines() if line.startswith("sensitivity")]
    assert sensitivity[1:5] == ["0.667", "2/3", "(95", "%"] and "gate: worklist (manual)" in out
    code, _, err = run_report(["--resamples", "0"], url, monkeypatch, capsys, tmp_path)
    assert code == 2 and err.strip() == "gatekeeper report: error: --resamples 0: expected at least 1"
    code, _, err = run_report([], f"sqlite:///{tmp_path / 'empty.db'}", monkeypatch, capsys, tmp_path)
    assert code == 2 and len(err.splitlines()) == 1 and "run `gatekeeper db upgrade`" in err


# --- the worklist ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """test_web's seeded worklist (the same phantoms) and one more series for the shadow review."""
    out = tmp_path_factory.mktemp("shadow-phantoms")
    return {
        "anomaly": write_phantom(out, anomaly=ANOMALY, seed=11),
        "geometry": write_phantom(out, anomaly=None, seed=12),
        "normal": write_phantom(out, anomaly=None, seed=13),
        "shadow": write_phantom(out, anomaly=None, seed=14),
    }


env = test_web.env  # a running worklist on PostgreSQL, seeded from `phantoms`


@pytest.fixture
def shadow_item(env: Env, phantoms: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """A withheld, auto-routed series with an open shadow-review item: (Series Instance UID, item id)."""
    storage = env.app.state.settings.storage_dir
    with env.sessions() as session:
        series, _ = add_series(
            session,
            folder=phantoms["shadow"],
            storage_dir=storage,
            state=SeriesState.WITHHELD,
            route=Route.AUTO,
            reason=None,
            name="Moe^Shadow",
        )
        item = WorklistItem(
            series_id=series.id,
            reason=RouteReason.SHADOW_REVIEW.value,
            detail={"question": SHADOW_REVIEW_QUESTION},
            status=WorklistStatus.OPEN.value,
        )
        session.add(item)
        session.commit()
        yield series.series_instance_uid, item.id


def test_the_worklist_shows_a_shadow_review_with_its_question_and_takes_yes_or_no(
    env: Env, shadow_item: tuple[str, int]
) -> None:
    uid, item_id = shadow_item
    with env.client() as browser:
        browser.post("/login", data={"name": "alice", "password": PASSWORDS["alice"]})
        page = browser.get("/worklist").text
        row = page[page.index(f'data-item-id="{item_id}"') :].split("</tr>")[0]
        assert "shadow-review" in page[: page.index(f'data-item-id="{item_id}"')].rsplit("<tr", 1)[1]
        assert SHADOW_REVIEW_QUESTION in row and "shadow review" in row
        assert 'value="yes"' in row and 'value="no"' in row and 'class="claim"' not in row
        # Filtered by its reason; the series page asks the same question.
        assert SHADOW_REVIEW_QUESTION in browser.get("/worklist?reason=shadow_review").text
        assert SHADOW_REVIEW_QUESTION in browser.get(f"/series/{uid}").text

        # It is answered, not claimed.
        assert browser.post(f"/worklist/{item_id}/claim", data={}).status_code == 409
        assert browser.post(f"/worklist/{item_id}/shadow-review", data={"verdict": "maybe"}).status_code == 422
        answered = browser.post(f"/worklist/{item_id}/shadow-review", data={"verdict": "no", "next": "/worklist"})
        assert answered.status_code == 303 and answered.headers["location"] == "/worklist"
        again = browser.post(f"/worklist/{item_id}/shadow-review", data={"verdict": "yes"})
        assert again.status_code == 409 and "answered already" in again.text
        done = browser.get("/worklist?status=done").text
        assert "answered by alice" in done[done.index(f'data-item-id="{item_id}"') :].split("</tr>")[0]

    with env.sessions() as session:
        item = session.get(WorklistItem, item_id)
        [feedback] = session.scalars(select(ContourFeedback).where(ContourFeedback.worklist_item_id == item_id))
        state = session.scalar(select(Series.state).where(Series.series_instance_uid == uid))
    assert item is not None and item.status == "done" and item.claimed_by == env.seeded.user_ids["alice"]
    assert (feedback.verdict, feedback.user_id) == ("no", env.seeded.user_ids["alice"])
    assert state == "withheld"  # an answer is a label, not a lifecycle step


def test_a_verdict_on_the_series_page_answers_the_shadow_review_too(env: Env, shadow_item: tuple[str, int]) -> None:
    uid, item_id = shadow_item
    client = env.client("bob")
    assert client.post(f"/api/series/{uid}/feedback", json={"verdict": "yes"}).status_code == 201
    entry = [e for e in client.get("/api/worklist?status=all").json() if e["id"] == item_id]
    assert [(e["status"], e["claimed_by"], e["reason"]) for e in entry] == [("done", "bob", "shadow_review")]
