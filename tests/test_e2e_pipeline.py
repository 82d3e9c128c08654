"""End to end, real everything: PostgreSQL, Redis, the listener and a Celery worker in their own
processes, the worklist web app, Orthanc as the PACS, DCMTK storescu as the scanner's PACS — and the
shipped models: detector, segmenter and the calibrated gate (models/gate/default), as a new site runs them.

A normal abdomen-range series ends with a SEG in Orthanc that references it; a gross stent is segmented
too and ends on the worklist, the gate's metal finding in words among its reasons, with a draft SEG
that is never sent. Then the worker is killed with SIGKILL while it scores a series; a new worker and
the sweeper still route that series exactly once. With `export_format` "both" a normal series ends
with its SEG and its RT Structure Set in Orthanc.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from ingest_support import (
    Db,
    ct_files,
    free_port,
    gatekeeper_executable,
    listener_process,
    make_settings,
    settings_env,
    storescu,
    upgrade,
    wait_for,
)
from sqlalchemy import func, select
from test_pacs_export import orthanc

from service.db.tables import Export, SeriesEvent, SeriesScore, WorklistItem
from service.lifecycle import SeriesState
from service.phantom.generate import SeriesSpec, generate_series
from service.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PASSWORD = "correct-horse-battery-staple"


@pytest.fixture(scope="module")
def segmenter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped segmenter; while none is shipped, a tiny one trained here (it finds 'liver' everywhere)."""
    from service.segmentation import DEFAULT_MODEL_DIR

    if (DEFAULT_MODEL_DIR / "model.json").exists():
        return DEFAULT_MODEL_DIR
    from service.commands.main import main
    from service.phantom.generate import SeriesSpec, generate_run

    data, out = tmp_path_factory.mktemp("segdata"), tmp_path_factory.mktemp("segmodel")
    specs = [
        SeriesSpec(
            folder=f"{split}/{i:04d}_normal",
            patient_seed=300 + i,
            series_seed=1300 + i,
            num_slices=14,
            matrix=64,
            split=split,
        )
        for i, split in enumerate(["train", "train", "validation"])
    ]
    generate_run(specs, data, progress=False)
    assert (
        main(
            [
                "train",
                "segmenter",
                "--data",
                str(data),
                "--out",
                str(out),
                "--size",
                "32",
                "--base",
                "4",
                "--steps",
                "4",
                "--batch",
                "4",
                "--val-every",
                "2",
                "--seed",
                "3",
                "--jobs",
                "1",
                "--threads",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    return out


#: The gate the pipeline uses unless configured otherwise: the shipped, calibrated one.
SHIPPED_GATE_DIR = Settings.model_fields["gate_model_dir"].default


@pytest.fixture(scope="module")
def abdomen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Phantoms the shipped gate was calibrated for: a clinic "abdomen" scan range (the whole liver in
    view, 2.5–5 mm slices) at 256², normal and with a gross stent; and a copy of the normal one in a
    series of its own (new UIDs, same pixels), for the worker that is killed."""
    out = tmp_path_factory.mktemp("abdomen")
    folders = {}
    for name, anomaly, grade, seed in (("normal", None, None, 7), ("stent", "stent", "gross", 8)):
        spec = SeriesSpec(
            folder=name,
            patient_seed=seed,
            series_seed=1000 + seed,
            anomaly=anomaly,
            grade=grade,
            matrix=256,
            scan_range="abdomen",
        )
        folders[name] = out / generate_series(spec, out)["folder"]
    folders["copy"] = relabelled(folders["normal"], out / "copy")
    return folders


def relabelled(folder: Path, out: Path) -> Path:
    """The CT files of `folder` as a new series: new Series and SOP Instance UIDs, nothing else changed."""
    out.mkdir(parents=True)
    series_uid = pydicom.uid.generate_uid()
    for path in ct_files(folder):
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        dataset.save_as(out / path.name)
    return out


def phantom(out: Path, *, anomaly: str, seed: int, slices: int) -> Path:
    """A phantom series made by `gatekeeper phantom` (128², `slices` slices); its folder."""
    from service.commands.main import main

    assert (
        main(
            [
                "phantom",
                "--out",
                str(out),
                "--slices",
                str(slices),
                "--matrix",
                "128",
                "--seed",
                str(seed),
                "--anomaly",
                anomaly,
                "--quiet",
            ]
        )
        == 0
    )
    [folder] = [p for p in out.iterdir() if p.is_dir()]
    return folder


def series_uid(folder: Path) -> str:
    return str(pydicom.dcmread(ct_files(folder)[0], stop_before_pixels=True).SeriesInstanceUID)


@contextmanager
def process(command: list[str], settings: Settings, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = log_path.open("ab")
    child = subprocess.Popen(command, env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT)
    try:
        yield child
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        log.close()


def test_normal_series_gets_a_seg_in_the_pacs_a_stent_the_worklist_and_a_killed_worker_routes_once(
    tmp_path: Path, postgres_db_url: str, redis_url: str, segmenter_dir: Path, abdomen: dict[str, Path]
) -> None:
    upgrade(postgres_db_url)
    normal, stent, victim = abdomen["normal"], abdomen["stent"], abdomen["copy"]
    db = Db(postgres_db_url)

    def state(uid: str) -> str | None:
        rows = db.series(uid)
        return rows[-1].state if rows else None

    with orthanc(tmp_path / "orthanc") as pacs:
        pacs.start()
        settings = make_settings(
            tmp_path / "var",
            postgres_db_url,
            redis_url,
            quiet_period_s=1.5,
            pacs_host="127.0.0.1",
            pacs_port=pacs.dicom_port,
            pacs_ae_title="ORTHANC",
            export_timeout_s=10,
            export_queue=f"test.export.{tmp_path.name}.{free_port()}",
            segmenter_model_dir=segmenter_dir,
            gate_model_dir=SHIPPED_GATE_DIR,
            pipeline_stuck_after_s=8,
            pipeline_sweep_interval_s=1,
            web_port=free_port(),
            web_secret_key="e2e-" + "k" * 40,
        )
        worker_command = [gatekeeper_executable(), "worker"]
        adduser = subprocess.run(
            [gatekeeper_executable(), "users", "add", "dosi", "--role", "dosimetrist", "--password-stdin"],
            input=PASSWORD + "\n",
            text=True,
            capture_output=True,
            env=settings_env(settings),
            timeout=60,
        )
        assert adduser.returncode == 0, adduser.stderr
        with (
            listener_process(settings, tmp_path / "listener.log"),
            process([gatekeeper_executable(), "web"], settings, tmp_path / "web.log"),
            process(worker_command, settings, tmp_path / "worker1.log") as worker,
        ):
            for folder in (normal, stent):
                sent = storescu(settings.port, ct_files(folder))
                assert sent.returncode == 0, sent.stdout[-2000:] + sent.stderr[-2000:]
            wait_for(
                lambda: (
                    state(series_uid(normal)) == SeriesState.DELIVERED
                    and state(series_uid(stent)) == SeriesState.WORKLISTED
                ),
                timeout=300,
                interval=0.5,
            )

            # The normal series: the shipped gate let it through; its SEG is in the PACS and references it.
            [normal_row] = db.series(series_uid(normal))
            with db.sessions() as session:
                [export] = session.scalars(select(Export).where(Export.series_id == normal_row.id)).all()
            [instance] = pacs.instances_with_uid(export.sop_instance_uid)
            tags = pacs.rest(f"/instances/{instance}/simplified-tags")
            assert tags["Modality"] == "SEG"
            assert tags["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == series_uid(normal)
            assert normal_row.route == "auto"

            # The stent: on the worklist by the shipped gate's fused evidence, metal among its findings.
            [stent_row] = db.series(series_uid(stent))
            with db.sessions() as session:
                [item] = session.scalars(select(WorklistItem).where(WorklistItem.series_id == stent_row.id)).all()
                [score] = session.scalars(select(SeriesScore).where(SeriesScore.series_id == stent_row.id)).all()
            assert item.reason == stent_row.route_reason == "gate_evidence"
            assert item.detail["gate_version"] == json.loads((SHIPPED_GATE_DIR / "gate.json").read_text())["version"]
            assert len(score.slices) == len(ct_files(stent))
            # Segmented too: the draft is stored, never sent (no export, nothing of it in the PACS).
            with db.sessions() as session:
                assert session.scalars(select(Export).where(Export.series_id == stent_row.id)).all() == []
            assert item.detail["draft"] and (settings.storage_dir / item.detail["draft"]).is_file()
            assert len(pacs.rest("/instances")) == 1  # the normal series' SEG only

            # ... and the worklist web app shows it, the metal finding in words.
            request = urllib.request.Request(
                f"http://127.0.0.1:{settings.web_port}/api/worklist",
                headers={"Authorization": "Basic " + base64.b64encode(f"dosi:{PASSWORD}".encode()).decode()},
            )
            worklist = wait_for(lambda: _get_json(request), timeout=30)
            [entry] = [e for e in worklist if e["series_instance_uid"] == series_uid(stent)]
            assert entry["reason"] == "gate_evidence"
            words = {f["signal"]: f["words"] for f in entry["findings"]}  # the fired findings, in plain words
            assert "metal-density pixels" in words["metal"]

            # kill -9 the worker while it scores a series.
            sent = storescu(settings.port, ct_files(victim))
            assert sent.returncode == 0
            wait_for(lambda: state(series_uid(victim)) == SeriesState.SCORING, timeout=60, interval=0.05)
            # Its third score task has started (a few seconds of ONNX Runtime for 60 slices).
            wait_for(
                lambda: (tmp_path / "worker1.log").read_text().count("Task gatekeeper.pipeline.score_series[") >= 3,
                timeout=30,
                interval=0.05,
            )
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait()
            [victim_row] = db.series(series_uid(victim))
            assert victim_row.state == SeriesState.SCORING, "the worker finished scoring before it was killed"
            with process(worker_command, settings, tmp_path / "worker2.log"):
                wait_for(lambda: state(series_uid(victim)) == SeriesState.DELIVERED, timeout=120, interval=0.5)
        with db.sessions() as session:
            scores = session.scalar(
                select(func.count()).select_from(SeriesScore).where(SeriesScore.series_id == victim_row.id)
            )
            kinds = list(
                session.scalars(
                    select(SeriesEvent.kind).where(SeriesEvent.series_id == victim_row.id).order_by(SeriesEvent.id)
                )
            )
        assert scores == 1 and kinds.count("segmenting") == 1 and kinds.count("exporting") == 1, kinds
        assert "requeued_scoring" in kinds
        assert len(pacs.instances_with_uid(_export_uid(db, victim_row.id))) == 1
    for name in (settings.score_queue, settings.segment_queue, settings.export_queue, settings.pipeline_queue):
        __import__("redis").Redis.from_url(redis_url).delete(name)
    logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert normal_row.patient_name and normal_row.patient_name not in logs
    db.close()


def test_export_format_both_delivers_the_seg_and_the_rtstruct_to_the_pacs(
    tmp_path: Path, postgres_db_url: str, redis_url: str, segmenter_dir: Path, abdomen: dict[str, Path]
) -> None:
    """GATEKEEPER_EXPORT_FORMAT=both: a normal series ends delivered, and Orthanc holds its SEG and its RTSTRUCT."""
    upgrade(postgres_db_url)
    normal = abdomen["normal"]
    db = Db(postgres_db_url)
    with orthanc(tmp_path / "orthanc") as pacs:
        pacs.start()
        settings = make_settings(
            tmp_path / "var",
            postgres_db_url,
            redis_url,
            quiet_period_s=1.5,
            pacs_host="127.0.0.1",
            pacs_port=pacs.dicom_port,
            pacs_ae_title="ORTHANC",
            export_timeout_s=10,
            export_queue=f"test.export.{tmp_path.name}.{free_port()}",
            segmenter_model_dir=segmenter_dir,
            gate_model_dir=SHIPPED_GATE_DIR,
            pipeline_sweep_interval_s=1,
            export_format="both",
            rtstruct_roi_name="Liver (auto)",
        )
        with (
            listener_process(settings, tmp_path / "listener.log"),
            process([gatekeeper_executable(), "worker"], settings, tmp_path / "worker.log"),
        ):
            sent = storescu(settings.port, ct_files(normal))
            assert sent.returncode == 0, sent.stdout[-2000:] + sent.stderr[-2000:]
            wait_for(
                lambda: [s.state for s in db.series(series_uid(normal))] == [SeriesState.DELIVERED],
                timeout=240,
                interval=0.5,
            )
        [row] = db.series(series_uid(normal))
        with db.sessions() as session:
            exports = session.scalars(select(Export).where(Export.series_id == row.id).order_by(Export.id)).all()
        assert [e.state for e in exports] == ["delivered", "delivered"]
        received = {}
        for export in exports:
            [instance] = pacs.instances_with_uid(export.sop_instance_uid)
            tags = pacs.rest(f"/instances/{instance}/simplified-tags")
            received[tags["Modality"]] = tags
        assert set(received) == {"SEG", "RTSTRUCT"}
        assert received["SEG"]["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == series_uid(normal)
        rtstruct = received["RTSTRUCT"]
        [roi] = rtstruct["StructureSetROISequence"]
        assert "liver" in roi["ROIName"].lower()
        [frame] = rtstruct["ReferencedFrameOfReferenceSequence"]
        [series] = frame["RTReferencedStudySequence"][0]["RTReferencedSeriesSequence"]
        assert series["SeriesInstanceUID"] == series_uid(normal)
        assert len(series["ContourImageSequence"]) == len(ct_files(normal))
    for name in (settings.score_queue, settings.segment_queue, settings.export_queue, settings.pipeline_queue):
        __import__("redis").Redis.from_url(redis_url).delete(name)
    db.close()


def _get_json(request: urllib.request.Request) -> object:
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except OSError:
        return None


def _export_uid(db: Db, series_id: int) -> str:
    with db.sessions() as session:
        return session.scalars(select(Export.sop_instance_uid).where(Export.series_id == series_id)).one()
