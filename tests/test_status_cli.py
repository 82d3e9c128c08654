"""`gatekeeper status [--json]` as the on-call person runs it, on a real PostgreSQL database: clean → exit
0; a stuck series, a failed export and an unreachable broker → exit 1 with each listed; not migrated → 2."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path

import pytest
from ingest_support import free_port, upgrade
from test_cli_database import GATEKEEPER, assert_one_line

from service.db.session import make_engine, make_session_factory
from service.db.tables import Export, Series

pytestmark = pytest.mark.integration

PATIENT_NAME = "Doe^Jane"


def run_status(
    args: list[str], *, database_url: str, broker_url: str, storage: Path
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEKEEPER_")}
    env |= {
        "GATEKEEPER_DATABASE_URL": database_url,
        "GATEKEEPER_BROKER_URL": broker_url,
        "GATEKEEPER_STORAGE_DIR": str(storage),
        "GATEKEEPER_MIN_FREE_DISK_BYTES": "0",
        "GATEKEEPER_MAX_DISK_USED_FRACTION": "1.0",
        "GATEKEEPER_PIPELINE_QUEUE": f"test.status.{free_port()}",
    }
    return subprocess.run([GATEKEEPER, "status", *args], env=env, capture_output=True, text=True, timeout=120)


def add_series(url: str, *, uid: str, state: str, state_age: dt.timedelta) -> int:
    now = dt.datetime.now(dt.UTC)
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            series = Series(
                series_instance_uid=uid,
                version=1,
                study_instance_uid="1.2.3",
                modality="CT",
                calling_ae_title="CT1",
                state=state,
                num_instances=3,
                first_received_at=now - state_age,
                last_received_at=now - state_age,
                completed_at=now - state_age,
                state_changed_at=now - state_age,
                geometry_findings=[],
                patient_name=PATIENT_NAME,
                patient_id="PID-DOE",
            )
            session.add(series)
            session.commit()
            return series.id
    finally:
        engine.dispose()


def add_failed_export(url: str, series_id: int) -> int:
    now = dt.datetime.now(dt.UTC)
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            export = Export(
                series_id=series_id,
                sop_instance_uid="1.2.3.9.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                path="results/1/liver-seg.dcm",
                destination="PACS@127.0.0.1:104",
                state="failed",
                attempts=1,
                last_status=0xA900,
                last_reason="0xA900 data set does not match SOP class",
                created_at=now,
                pending_since=now,
            )
            session.add(export)
            session.commit()
            return export.id
    finally:
        engine.dispose()


def test_status_is_ok_and_exits_0_when_nothing_needs_a_person(
    tmp_path: Path, postgres_db_url: str, redis_url: str
) -> None:
    upgrade(postgres_db_url)
    add_series(postgres_db_url, uid="1.2.3.1", state="delivered", state_age=dt.timedelta(hours=5))
    result = run_status([], database_url=postgres_db_url, broker_url=redis_url, storage=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: nothing needs a person." in result.stdout
    assert "delivered" in result.stdout and "no worker heartbeat" in result.stdout
    assert "Model detector:" in result.stdout and "Model segmenter:" in result.stdout


def test_stuck_series_failed_export_and_broker_down_need_a_person(
    tmp_path: Path, postgres_db_url: str, redis_url: str
) -> None:
    upgrade(postgres_db_url)
    stuck = add_series(postgres_db_url, uid="1.2.3.2", state="scoring", state_age=dt.timedelta(hours=2))
    add_series(postgres_db_url, uid="1.2.3.3", state="scoring", state_age=dt.timedelta(seconds=5))  # working, fine
    failed_series = add_series(postgres_db_url, uid="1.2.3.4", state="export_failed", state_age=dt.timedelta(hours=1))
    export_id = add_failed_export(postgres_db_url, failed_series)

    result = run_status([], database_url=postgres_db_url, broker_url=redis_url, storage=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "NEEDS A PERSON:" in result.stdout
    assert f"id {stuck} scoring 2 h" in result.stdout
    assert f"export {export_id}: 0xA900" in result.stdout
    assert PATIENT_NAME not in result.stdout + result.stderr and "PID-DOE" not in result.stdout

    result = run_status(
        ["--json"], database_url=postgres_db_url, broker_url=f"redis://127.0.0.1:{free_port()}/0", storage=tmp_path
    )
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert {f["code"] for f in report["findings"]} == {"stuck_series", "failed_exports", "broker_unreachable"}
    assert report["needs_attention"] is True
    assert report["series"]["scoring"]["count"] == 2 and report["series"]["scoring"]["oldest_age_s"] >= 7000
    assert [s["series_id"] for s in report["stuck_series"]] == [stuck]
    assert [e["id"] for e in report["exports"]["failed"]] == [export_id]
    assert report["broker"] == {"reachable": False, "queues": {}}
    assert set(report["disk"]) >= {"free_bytes", "reserve_bytes", "path"}
    assert [m["model"] for m in report["models"]] == ["detector", "segmenter"]
    assert all(m["version"] for m in report["models"])
    assert PATIENT_NAME not in result.stdout


def test_status_on_an_unmigrated_database_is_one_line_and_exit_2(
    tmp_path: Path, postgres_db_url: str, redis_url: str
) -> None:
    result = run_status([], database_url=postgres_db_url, broker_url=redis_url, storage=tmp_path)
    assert_one_line(result, "run `gatekeeper db upgrade`")
