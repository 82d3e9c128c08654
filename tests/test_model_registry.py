"""The model registry (issue 13): register / promote / roll back / list on PostgreSQL, a real Celery worker
that follows promotions without a restart, retraining the segmenter from the pool, and `evaluate candidate`.

The second versions are copies of the shipped models with another version in model.json (same
network, so the pipeline's routes stay those of the shipped models); the retrain runs a few steps on
tiny phantom series.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from ingest_support import (
    Db,
    clone_series,
    free_port,
    gatekeeper_executable,
    make_settings,
    running_listener,
    settings_env,
    storescu,
    upgrade,
    wait_for,
)
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from test_cli_database import assert_one_line, run_gatekeeper

from service.commands.main import main
from service.db.tables import ModelEvent, ModelStatus, ModelVersion, SeriesEvent, SeriesScore
from service.model_registry import RegistryError, verify_files
from service.settings import Settings, get_settings, settings_environment

SHIPPED_DETECTOR = Path(__file__).resolve().parent.parent / "models" / "detector" / "default"
SHIPPED_SEGMENTER = Path(__file__).resolve().parent.parent / "models" / "segmenter" / "default"


def relabelled_copy(source: Path, out: Path, version: str) -> Path:
    """A copy of a model folder (model.json and ONNX files) whose model.json names another version."""
    out.mkdir(parents=True)
    for path in [source / "model.json", *source.glob("*.onnx")]:
        shutil.copy2(path, out / path.name)
    meta = json.loads((out / "model.json").read_text())
    meta["version"] = version
    (out / "model.json").write_text(json.dumps(meta, indent=1))
    return out


@pytest.fixture
def use_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Point this process's settings (what `gatekeeper` commands read) at the given settings."""

    def apply(settings: Settings) -> None:
        for key in [k for k in os.environ if k.startswith("GATEKEEPER_")]:
            monkeypatch.delenv(key)
        for key, value in settings_environment(settings).items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()

    yield apply
    get_settings.cache_clear()


def models_list(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert main(["models", "list", "--json"]) == 0
    rows: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return rows


def status_of(rows: list[dict[str, Any]], kind: str) -> dict[str, str]:
    return {r["version"]: r["status"] for r in rows if r["kind"] == kind}


@pytest.mark.integration
def test_register_promote_rollback_and_list_on_postgres(
    tmp_path: Path, postgres_db_url: str, use_settings: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.inference import load_detector
    from service.segmentation import read_model_json

    upgrade(postgres_db_url)
    settings = Settings(storage_dir=tmp_path / "var", database_url=postgres_db_url)
    use_settings(settings)

    # First use: the shipped models are registered as the active versions, with the versions results carry.
    rows = models_list(capsys)
    shipped_segmenter = str(read_model_json(SHIPPED_SEGMENTER)["version"])
    shipped_detector = load_detector(SHIPPED_DETECTOR).version
    assert status_of(rows, "segmenter") == {shipped_segmenter: "active"}
    assert status_of(rows, "detector") == {shipped_detector: "active"}
    assert all({"kind", "version", "status", "sha256", "training_data", "metrics"} <= set(r) for r in rows)
    assert models_list(capsys) == rows  # idempotent

    b = relabelled_copy(SHIPPED_SEGMENTER, tmp_path / "b", "test-b")
    assert main(["models", "register", "segmenter", str(b), "--by", "alice"]) == 0
    assert main(["models", "register", "segmenter", str(b), "--by", "alice"]) == 0  # same files: no second row
    assert "already registered" in capsys.readouterr().out
    assert status_of(models_list(capsys), "segmenter") == {shipped_segmenter: "active", "test-b": "candidate"}
    other = relabelled_copy(SHIPPED_SEGMENTER, tmp_path / "other", "test-b")
    (other / "model.json").write_text(
        (other / "model.json").read_text().replace('"threshold": 0.5', '"threshold": 0.6')
    )
    assert main(["models", "register", "segmenter", str(other)]) == 2  # same version, other files
    assert "already registered with other files" in capsys.readouterr().err

    assert main(["models", "promote", "segmenter", "test-b", "--by", "bob"]) == 0
    rows = models_list(capsys)
    assert status_of(rows, "segmenter") == {shipped_segmenter: "retired", "test-b": "active"}
    [promoted] = [r for r in rows if r["version"] == "test-b"]
    assert promoted["promoted_by"] == "bob" and promoted["registered_by"] == "alice" and promoted["promoted_at"]
    assert main(["models", "promote", "segmenter", "test-b"]) == 2
    assert main(["models", "promote", "segmenter", "no-such-version"]) == 2
    assert status_of(rows, "detector") == {shipped_detector: "active"}  # the other kind is untouched

    assert main(["models", "rollback", "segmenter", "--by", "carol"]) == 0
    rows = models_list(capsys)
    assert status_of(rows, "segmenter") == {shipped_segmenter: "active", "test-b": "retired"}
    assert main(["models", "rollback", "segmenter"]) == 2  # the shipped one replaced nothing
    assert "nothing to roll back to" in capsys.readouterr().err

    db = Db(postgres_db_url)
    try:
        with db.sessions() as session:
            actions = session.execute(
                select(ModelVersion.version, ModelEvent.action, ModelEvent.actor)
                .join(ModelVersion, ModelVersion.id == ModelEvent.model_version_id)
                .where(ModelVersion.kind == "segmenter")
                .order_by(ModelEvent.id)
            ).all()
        assert [tuple(a) for a in actions] == [
            (shipped_segmenter, "registered", "gatekeeper"),
            (shipped_segmenter, "promoted", "gatekeeper"),
            ("test-b", "registered", "alice"),
            ("test-b", "promoted", "bob"),
            (shipped_segmenter, "retired", "bob"),
            ("test-b", "rolled_back", "carol"),
            (shipped_segmenter, "restored", "carol"),
        ]
        # The database itself refuses a second active version of a kind.
        with pytest.raises(IntegrityError), db.sessions.begin() as session:
            session.execute(
                update(ModelVersion).where(ModelVersion.version == "test-b").values(status=ModelStatus.ACTIVE.value)
            )
        # Files that changed after registration are refused, not loaded.
        from service.model_registry import ModelRecord

        with db.sessions() as session:
            record = ModelRecord.of(session.scalars(select(ModelVersion).where(ModelVersion.version == "test-b")).one())
        assert verify_files(record, settings) == settings.storage_dir / "models" / "segmenter" / "test-b"
        (record.folder(settings) / "model.json").write_text("{}")
        with pytest.raises(RegistryError, match="changed since registration"):
            verify_files(record, settings)
    finally:
        db.close()


def test_models_commands_on_an_empty_database_say_db_upgrade(tmp_path: Path) -> None:
    result = run_gatekeeper(
        ["models", "list"], database_url=f"sqlite:///{tmp_path / 'empty.db'}", storage=tmp_path / "var"
    )
    assert_one_line(result, "gatekeeper db upgrade")


@pytest.mark.integration
@pytest.mark.slow
def test_a_running_worker_follows_promotion_and_rollback_without_a_restart(
    tmp_path: Path, postgres_db_url: str, redis_url: str, use_settings: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from ingest_support import make_phantom

    upgrade(postgres_db_url)
    [template] = make_phantom(tmp_path / "phantom", slices=24, seed=5)  # a normal series the gate lets through
    settings = make_settings(
        tmp_path / "var",
        postgres_db_url,
        redis_url,
        quiet_period_s=1.0,
        export_queue=f"test.export.{tmp_path.name}.{free_port()}",
    )
    use_settings(settings)
    db = Db(postgres_db_url)
    log_path = tmp_path / "worker.log"

    def send(n: int) -> str:
        paths = clone_series(template, tmp_path / f"series{n}", 24)
        sent = storescu(listener.port, paths)
        assert sent.returncode == 0, sent.stderr[-2000:]
        return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)

    def finished(uid: str) -> tuple[str, str, str, str]:
        """(detector version of its score, segmenter version recorded, worker, final state) once it is done."""

        def done() -> Any:
            assert worker.poll() is None, log_path.read_text()[-3000:]
            rows = db.series(uid)
            return rows and rows[-1].state in ("export_failed", "exporting", "delivered", "worklisted") and rows[-1]

        series = wait_for(done, timeout=300, interval=0.5)
        with db.sessions() as session:
            score = session.scalars(select(SeriesScore).where(SeriesScore.series_id == series.id)).one()
            events = session.scalars(
                select(SeriesEvent).where(SeriesEvent.series_id == series.id).order_by(SeriesEvent.id)
            ).all()
        segmenter = next(e.detail["segmenter_version"] for e in events if "segmenter_version" in e.detail)
        worker_name = next(e.detail["worker"] for e in events if e.kind == "scoring")
        return score.model_version, segmenter, worker_name, series.state

    with (
        log_path.open("ab") as log,
        running_listener(settings) as listener,
    ):
        worker = subprocess.Popen(
            [gatekeeper_executable(), "worker"], env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            a_detector, a_segmenter, first_worker, state = finished(send(1))
            assert state == "export_failed"  # segmented; no PACS is configured in this test
            rows = models_list(capsys)
            assert status_of(rows, "detector") == {a_detector: "active"}
            assert status_of(rows, "segmenter") == {a_segmenter: "active"}

            b_detector = relabelled_copy(SHIPPED_DETECTOR, tmp_path / "detector-b", "detector-test-b")
            b_segmenter = relabelled_copy(SHIPPED_SEGMENTER, tmp_path / "segmenter-b", "segmenter-test-b")
            assert main(["models", "register", "detector", str(b_detector)]) == 0
            assert main(["models", "register", "segmenter", str(b_segmenter)]) == 0
            assert main(["models", "promote", "detector", "detector-test-b", "--by", "qa"]) == 0
            assert main(["models", "promote", "segmenter", "segmenter-test-b", "--by", "qa"]) == 0
            assert finished(send(2))[:3] == ("detector-test-b", "segmenter-test-b", first_worker)
            assert main(["models", "rollback", "detector"]) == 0
            assert main(["models", "rollback", "segmenter"]) == 0
            assert finished(send(3))[:3] == (a_detector, a_segmenter, first_worker)
            assert worker.poll() is None  # one worker process throughout
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            db.close()


# --- retraining from the pool, and the candidate's evaluation ------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Base data (2 training + 1 validation normal series) and a pool (a tumour and a fluid series)."""
    from service.phantom.generate import SeriesSpec, generate_run

    out = tmp_path_factory.mktemp("pool-data")
    base = [
        SeriesSpec(folder=f"{i:02d}_{s}", patient_seed=700 + i, series_seed=1700 + i, num_slices=16, matrix=64, split=s)
        for i, s in enumerate(["train", "train", "validation"])
    ]
    pool = [
        SeriesSpec(
            folder=f"{i:02d}_{a}", patient_seed=800 + i, series_seed=1800 + i, anomaly=a, num_slices=16, matrix=64
        )
        for i, a in enumerate(["tumor", "fluid"])
    ]
    generate_run(base, out / "base", progress=False)
    generate_run(pool, out / "pool", progress=False)
    return out / "base", out / "pool"


def test_combined_detector_folder_counts_the_pool_as_normal_training_series(
    tiny_data: tuple[Path, Path], tmp_path: Path
) -> None:
    from models.active_learning.detector import combined_training_folder
    from models.detector.data import normal_splits, scan_parallel
    from service import dicom_series

    base, pool = tiny_data
    manifest = combined_training_folder(base=base, pool=pool, out=tmp_path / "data", seed=0, jobs=1)
    groups = dicom_series.ct_series_in(scan_parallel(tmp_path / "data", 1))
    splits, _ = normal_splits(tmp_path / "data", groups)
    pool_uids = {e["series_instance_uid"] for e in manifest["series"] if e.get("pool")}
    assert len(groups) == 5 and len(pool_uids) == 2
    assert sorted(splits[g.series_instance_uid] for g in groups) == ["train"] * 4 + ["validation"]
    assert all(splits[uid] == "train" for uid in pool_uids)


@pytest.mark.slow
def test_train_segmenter_from_the_pool_registers_a_candidate_that_evaluate_candidate_judges(
    tiny_data: tuple[Path, Path], tmp_path: Path, use_settings: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    torch.set_num_threads(1)
    base, pool = tiny_data
    url = f"sqlite:///{tmp_path / 'gatekeeper.db'}"
    upgrade(url)
    settings = Settings(storage_dir=tmp_path / "var", database_url=url)
    use_settings(settings)
    out = tmp_path / "candidate"
    common = ["--out", str(out), "--jobs", "1", "--threads", "1", "--no-progress"]
    # The database's pool is empty: nothing to retrain on, one line, exit 2.
    assert main(["train", "segmenter", "--pool", "--data", str(base), *common]) == 2
    assert "training pool is empty" in capsys.readouterr().err
    rc = main(
        [
            "train",
            "segmenter",
            "--pool",
            "--data",
            str(base),
            "--pool-dir",
            str(pool),
            "--out",
            str(out),
            "--fine-tune-steps",
            "3",
            "--batch",
            "2",
            "--jobs",
            "1",
            "--threads",
            "1",
            "--no-progress",
            "--by",
            "trainer",
        ]
    )
    assert rc == 0
    rows = models_list(capsys)
    [candidate] = [r for r in rows if r["kind"] == "segmenter" and r["status"] == "candidate"]
    [active] = [r for r in rows if r["kind"] == "segmenter" and r["status"] == "active"]
    meta = json.loads((out / "model.json").read_text())
    assert candidate["version"] == meta["version"] != active["version"]
    assert candidate["registered_by"] == "trainer" and candidate["metrics"]["trained_steps"] == 3
    training = candidate["training_data"]
    assert training["parent_version"] == active["version"] and training["pool_series"] == 2
    assert training["pool_kinds"] == ["fluid", "tumor"] and len(training["base_data_hash"]) == 64
    assert meta["training"]["train_series"] == 4 and meta["training"]["validation_series"] == 1

    rc = main(
        [
            "evaluate",
            "candidate",
            "segmenter",
            candidate["version"],
            "--per-type",
            "1",
            "--types",
            "normal,tumor",
            "--slices",
            "12",
            "--matrix",
            "64",
            "--json",
            "--no-progress",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert rc == (0 if report["safe"] else 1)
    assert (report["candidate"], report["active"]) == (candidate["version"], active["version"])
    assert set(report["per_type"]) == {"normal", "tumor"} and report["series"] == 2
    assert [c["name"] for c in report["checks"]] == ["normals", "pool kinds"]
    assert report["pool_kinds"] == ["fluid", "tumor"] and report["tolerance"] == 0.01
    assert main(["evaluate", "candidate", "segmenter", "no-such-version"]) == 2


@pytest.mark.slow
def test_train_detector_from_the_pool_registers_a_candidate_trained_on_base_and_pool(
    tiny_data: tuple[Path, Path], tmp_path: Path, use_settings: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    torch.set_num_threads(1)
    base, pool = tiny_data
    url = f"sqlite:///{tmp_path / 'gatekeeper.db'}"
    upgrade(url)
    use_settings(Settings(storage_dir=tmp_path / "var", database_url=url))
    out = tmp_path / "candidate"
    tiny = ["--size", "64", "--family", "dcgan", "--position-steps", "10", "--gan-steps", "5"]
    tiny += ["--encoder-steps", "10", "--batch", "8", "--seed", "3", "--jobs", "1", "--threads", "1"]
    common = ["--data", str(base), "--out", str(out), *tiny, "--no-progress", "--by", "trainer"]
    rc = main(["train", "detector", "--pool", "--pool-dir", str(pool), *common])
    assert rc == 0
    rows = models_list(capsys)
    [candidate] = [r for r in rows if r["kind"] == "detector" and r["status"] == "candidate"]
    [active] = [r for r in rows if r["kind"] == "detector" and r["status"] == "active"]
    assert candidate["version"] != active["version"] and (out / "model.json").is_file()
    assert candidate["registered_by"] == "trainer"
    training = candidate["training_data"]
    assert training["pool_series"] == 2 and training["parent_version"] == active["version"]
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    pooled = [e for e in manifest["series"] if e.get("pool")]
    assert len(pooled) == 2 and {e["split"] for e in pooled} == {"train"}


def test_a_gate_version_is_registered_from_its_gate_json_and_a_bad_folder_is_refused(tmp_path: Path) -> None:
    from service.db.session import make_engine, make_session_factory
    from service.db.tables import ModelKind
    from service.model_registry import model_hash, register

    url = f"sqlite:///{tmp_path / 'gatekeeper.db'}"
    upgrade(url)
    settings = Settings(storage_dir=tmp_path / "var", database_url=url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    try:
        gate = tmp_path / "gate"
        gate.mkdir()
        (gate / "gate.json").write_text(json.dumps({"threshold": 1.2, "metrics": {"recall": 0.97}}))
        record, new = register(sessions=sessions, settings=settings, kind=ModelKind.GATE, folder=gate, actor="me")
        assert new and record.status == "candidate" and record.metrics == {"recall": 0.97, "threshold": 1.2}
        assert record.version == model_hash(ModelKind.GATE, gate)[:16] == record.sha256[:16]
        assert (record.folder(settings) / "gate.json").read_text() == (gate / "gate.json").read_text()
        with pytest.raises(RegistryError, match="no model.json"):
            register(sessions=sessions, settings=settings, kind=ModelKind.SEGMENTER, folder=gate, actor="me")
        with pytest.raises(RegistryError, match="no such folder"):
            register(sessions=sessions, settings=settings, kind=ModelKind.DETECTOR, folder=tmp_path / "x", actor="me")
    finally:
        engine.dispose()


def test_workers_load_the_active_gate_rules_only_until_there_is_one_and_follow_a_promotion(tmp_path: Path) -> None:
    from service.db.session import make_engine, make_session_factory
    from service.db.tables import ModelKind
    from service.model_registry import promote, register
    from service.pipeline.tasks import Models

    def gate_folder(name: str, version: str, reference: bytes | None = None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        config: dict[str, Any] = {"format": 1, "kind": "ct-gatekeeper-gate", "version": version, "signals": {}}
        if reference is not None:
            (folder / "reference.npz").write_bytes(reference)
            config["reference"] = {"file": "reference.npz", "sha256": "not checked by a rules-only gate"}
        (folder / "gate.json").write_text(json.dumps(config))
        return folder

    url = f"sqlite:///{tmp_path / 'gatekeeper.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    try:
        # No gate.json shipped and none registered: the rules-only gate, and nothing registered.
        settings = Settings(storage_dir=tmp_path / "var", database_url=url, gate_model_dir=tmp_path / "none")
        assert Models(settings, sessions).gate().version == "rules-only"
        assert Models(settings).gate().version == "rules-only"
        with sessions() as session:
            assert session.scalars(select(ModelVersion)).all() == []
        # A shipped gate.json: registered and made active on first use, as the segmenter and detector are.
        shipped = gate_folder("shipped", "gate-1", reference=b"calibration arrays")
        settings = settings.model_copy(update={"gate_model_dir": shipped})
        models = Models(settings, sessions)
        assert models.gate().version == "gate-1" and models.gate() is models.gate()  # loaded once
        with sessions() as session:
            [row] = session.scalars(select(ModelVersion)).all()
        assert (row.kind, row.version, row.status) == ("gate", "gate-1", "active")
        # The reference file gate.json names is part of the registered version.
        assert (settings.storage_dir / row.path / "reference.npz").read_bytes() == b"calibration arrays"
        # A promotion takes effect at the next call, without a restart.
        register(
            sessions=sessions, settings=settings, kind=ModelKind.GATE, folder=gate_folder("new", "gate-2"), actor="me"
        )
        promote(sessions=sessions, kind=ModelKind.GATE, version="gate-2", actor="me")
        assert models.gate().version == "gate-2"
        missing = gate_folder("missing", "gate-3")
        (missing / "gate.json").write_text(
            json.dumps({"format": 1, "kind": "ct-gatekeeper-gate", "version": "gate-3", "reference": {"file": "x.npz"}})
        )
        with pytest.raises(RegistryError, match="reference file"):
            register(sessions=sessions, settings=settings, kind=ModelKind.GATE, folder=missing, actor="me")
    finally:
        engine.dispose()
