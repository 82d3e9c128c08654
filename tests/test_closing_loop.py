"""Closing the loop (issue 13, item 6), one chain with real peers: PostgreSQL, Redis, `gatekeeper listen` and
`gatekeeper worker` in their own processes, Orthanc as the PACS / TPS, DCMTK storescu as the scanner's sender.

1. storescu sends a phantom series the gate flags (a truncated field of view: the shipped detector scores it
   far above its threshold) → it ends on the worklist.
2. An RT Structure Set made with rt-utils from the phantom's ground-truth liver is uploaded into Orthanc,
   which C-STOREs it to our listener → matched, the pool grows, the series is `contoured`.
3. `gatekeeper train segmenter --pool` (one step) registers a candidate.
4. `gatekeeper models promote segmenter VERSION` → the next series (a normal one) is scored by the active
   detector and segmented by the candidate, which its events and the SEG in Orthanc record.
5. `gatekeeper models rollback segmenter` → the next series is segmented by the shipped version again.
6. A malformed RT Structure Set and one that references an unknown series, sent the same way through
   Orthanc, are listed by `gatekeeper contours list` with their reasons; the listener still accepts.
"""

from __future__ import annotations

import io
import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import redis
from ingest_support import (
    Db,
    clone_series,
    ct_files,
    echoscu,
    free_port,
    gatekeeper_executable,
    listener_process,
    make_settings,
    storescu,
    upgrade,
    wait_for,
)
from pydicom.uid import generate_uid
from sqlalchemy import select
from test_contours import Phantom, dice, gatekeeper_json, make_rtstruct, process, renewed, truth_volume
from test_e2e_pipeline import phantom, series_uid
from test_model_registry import models_list, status_of
from test_pacs_export import Orthanc, gatekeeper_env, orthanc

from service.commands.main import main
from service.contours import load_pool_mask
from service.db.tables import ContourObject, Export, PoolEntry, Series, SeriesEvent, SeriesScore, WorklistItem
from service.lifecycle import SeriesState
from service.phantom.truth import load_manifest, load_series
from service.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SLICES = 30  # at 128², as the end-to-end pipeline test sends
WAIT_S = 180  # a series through the pipeline, or a contour through the contour stage, on a loaded 2-core machine
UNKNOWN_SERIES = "1.2.826.0.1.3680043.10.543.999"


def phantom_with_truth(out: Path, *, anomaly: str, seed: int) -> Phantom:
    """A `gatekeeper phantom` series (128², `SLICES` slices) and its ground-truth liver by SOP Instance UID."""
    folder = phantom(out, anomaly=anomaly, seed=seed, slices=SLICES)
    [entry] = load_manifest(out)["series"]
    truth = load_series(out, entry)
    liver = truth.labels == 1
    assert liver.sum() > 300, "the phantom series must show the liver"
    return Phantom(folder, dict(zip(truth.sop_instance_uids, liver, strict=True)))


def base_data(out: Path) -> Path:
    """The retrain's base data: two normal training series and one validation series (16 slices, 64²)."""
    from service.phantom.generate import SeriesSpec, generate_run

    specs = [
        SeriesSpec(folder=f"{i:02d}_{s}", patient_seed=700 + i, series_seed=1700 + i, num_slices=16, matrix=64, split=s)
        for i, s in enumerate(["train", "train", "validation"])
    ]
    generate_run(specs, out, progress=False)
    return out


def break_contour(ds: pydicom.Dataset) -> None:
    """Malformed: the first contour's ContourData is not x/y/z triplets."""
    ds.ROIContourSequence[0].ContourSequence[0].ContourData = [1.0, 2.0]


def elsewhere(ds: pydicom.Dataset) -> None:
    """References a series, images and frame of reference that we never received."""
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    frame.FrameOfReferenceUID = ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID = generate_uid()
    [rt_series] = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence
    rt_series.SeriesInstanceUID = UNKNOWN_SERIES
    for image in rt_series.ContourImageSequence:
        image.ReferencedSOPInstanceUID = generate_uid()
    for contour in ds.ROIContourSequence[0].ContourSequence:
        contour.ContourImageSequence[0].ReferencedSOPInstanceUID = generate_uid()


def send_through_orthanc(pacs: Orthanc, paths: list[Path]) -> None:
    """Upload `paths` into Orthanc (REST), then have Orthanc C-STORE them to our listener (modality "gatekeeper")."""
    ids = []
    for path in paths:
        answer = pacs.rest("/instances", path.read_bytes())
        assert answer["Status"] == "Success", answer
        ids.append(answer["ID"])
    stored = pacs.rest("/modalities/gatekeeper/store", json.dumps({"Resources": ids, "Synchronous": True}).encode())
    assert stored["FailedInstancesCount"] == 0 and stored["InstancesCount"] == len(paths), stored


def file_in_pacs(pacs: Orthanc, sop_instance_uid: str) -> pydicom.Dataset:
    [instance] = pacs.instances_with_uid(sop_instance_uid)
    with urllib.request.urlopen(f"http://127.0.0.1:{pacs.http_port}/instances/{instance}/file", timeout=30) as answer:
        return pydicom.dcmread(io.BytesIO(answer.read()))


@dataclass(frozen=True)
class Recorded:
    """What a series' events say about how it was routed and with which model versions."""

    routes: list[str]  # the `route` of each event that records a routing decision ("auto", "worklist")
    detector_versions: set[str]  # every detector version its events name (the score and the route)
    segmenter_versions: set[str]  # every segmenter version its events name


def recorded(db: Db, series_id: int) -> Recorded:
    with db.sessions() as session:
        details = [
            d or {}
            for d in session.scalars(
                select(SeriesEvent.detail).where(SeriesEvent.series_id == series_id).order_by(SeriesEvent.id)
            )
        ]
    return Recorded(
        routes=[str(d["route"]) for d in details if "route" in d],
        detector_versions={str(d[k]) for d in details for k in ("model_version", "detector_version") if d.get(k)},
        segmenter_versions={str(d["segmenter_version"]) for d in details if d.get("segmenter_version")},
    )


@dataclass(frozen=True)
class Handled:
    """What the pipeline recorded for one delivered series."""

    series: Series
    score: SeriesScore
    events: Recorded
    seg_versions: set[str]  # AlgorithmVersion of its SEG(s): as delivered to Orthanc and as kept on disk


def delivered(db: Db, pacs: Orthanc, settings: Settings, uid: str, *, alive: Any) -> Handled:
    """Wait until series `uid` is delivered; what it was scored, routed and segmented with."""

    def done() -> Series | None:
        alive()
        rows = db.series(uid)
        assert not rows or rows[-1].state not in (
            SeriesState.WORKLISTED,
            SeriesState.WITHHELD,
            SeriesState.EXPORT_FAILED,
        ), rows[-1].state
        return rows[-1] if rows and rows[-1].state == SeriesState.DELIVERED else None

    series = wait_for(done, timeout=WAIT_S, interval=0.5)
    with db.sessions() as session:
        score = session.scalars(select(SeriesScore).where(SeriesScore.series_id == series.id)).one()
        exports = session.scalars(select(Export).where(Export.series_id == series.id)).all()
    seg_versions = set()
    assert exports and {e.state for e in exports} == {"delivered"}
    for export in exports:
        for ds in (file_in_pacs(pacs, export.sop_instance_uid), pydicom.dcmread(settings.storage_dir / export.path)):
            assert ds.Modality == "SEG" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
            for segment in ds.SegmentSequence:
                seg_versions.add(str(segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion))
    return Handled(
        series=series,
        score=score,
        events=recorded(db, series.id),
        seg_versions=seg_versions,
    )


def test_a_flagged_series_comes_back_contoured_retrains_the_segmenter_and_promotion_and_rollback_take_effect(
    tmp_path: Path,
    postgres_db_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upgrade(postgres_db_url)
    flagged = phantom_with_truth(tmp_path / "flagged", anomaly="truncation", seed=7)
    normal = phantom(tmp_path / "normal", anomaly="none", seed=5, slices=SLICES)
    base = base_data(tmp_path / "base")
    db = Db(postgres_db_url)

    with orthanc(tmp_path / "orthanc") as pacs:
        settings = make_settings(
            tmp_path / "var",
            postgres_db_url,
            redis_url,
            allowed_ae_titles=["STORESCU", "ECHOSCU", "ORTHANC"],
            pacs_host="127.0.0.1",
            pacs_port=pacs.dicom_port,
            pacs_ae_title="ORTHANC",
            export_timeout_s=60,
            export_queue=f"test.export.{tmp_path.name}.{free_port()}",
            pipeline_sweep_interval_s=1,
        )
        # Orthanc knows our listener as the modality "gatekeeper" (it C-STOREs contours to it); it accepts our SEGs.
        pacs.start(DicomModalities={"gatekeeper": [settings.ae_title, "127.0.0.1", settings.port]})
        with (
            gatekeeper_env(monkeypatch, settings),  # for the `gatekeeper` commands run in this process
            listener_process(settings, tmp_path / "listener.log") as listener,
            process([gatekeeper_executable(), "worker"], settings, tmp_path / "worker.log") as worker,
        ):

            def alive() -> None:
                assert listener.poll() is None, (tmp_path / "listener.log").read_text()[-3000:]
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]

            def state(uid: str) -> str | None:
                alive()
                rows = db.series(uid)
                return rows[-1].state if rows else None

            # 1. The flagged series goes to the worklist.
            sent = storescu(settings.port, ct_files(flagged.folder))
            assert sent.returncode == 0, sent.stdout[-2000:] + sent.stderr[-2000:]
            wait_for(lambda: state(flagged.series_instance_uid) == SeriesState.WORKLISTED, WAIT_S, 0.5)
            [flagged_row] = db.series(flagged.series_instance_uid)
            with db.sessions() as session:
                flagged_score = session.scalars(
                    select(SeriesScore).where(SeriesScore.series_id == flagged_row.id)
                ).one()
                [item] = session.scalars(select(WorklistItem).where(WorklistItem.series_id == flagged_row.id)).all()
            assert flagged_score.flagged and flagged_score.score > flagged_score.threshold
            assert flagged_row.route == "worklist" and item.status == "open"
            rows = models_list(capsys)
            [shipped_detector] = [r["version"] for r in rows if r["kind"] == "detector" and r["status"] == "active"]
            [shipped_segmenter] = [r["version"] for r in rows if r["kind"] == "segmenter" and r["status"] == "active"]
            assert flagged_score.model_version == shipped_detector
            flagged_events = recorded(db, flagged_row.id)
            assert flagged_events.routes == ["worklist"] and flagged_events.detector_versions == {shipped_detector}

            # 2. Its liver contour comes back from the TPS through Orthanc: matched, pooled, `contoured`.
            rtstruct = make_rtstruct(flagged, tmp_path / "returned.dcm")
            rtstruct_uid = str(pydicom.dcmread(rtstruct).SOPInstanceUID)
            send_through_orthanc(pacs, [rtstruct])
            wait_for(lambda: state(flagged.series_instance_uid) == SeriesState.CONTOURED, WAIT_S, 0.5)
            [pooled] = gatekeeper_json(["pool", "list", "--json"], capsys)
            assert pooled["series_instance_uid"] == flagged.series_instance_uid
            assert pooled["contour_sop_instance_uid"] == rtstruct_uid
            assert pooled["calling_ae_title"] == "ORTHANC" and pooled["structure_name"] == "Liver"
            with db.sessions() as session:
                entry = session.scalars(select(PoolEntry)).one()
                contoured_item = session.get(WorklistItem, item.id)
            assert contoured_item is not None and contoured_item.status == "contoured"
            pool_mask = load_pool_mask(settings=settings, entry=entry)
            assert len(pool_mask.sop_instance_uids) == SLICES
            assert dice(pool_mask.liver, truth_volume(flagged, pool_mask.sop_instance_uids)) >= 0.95

            # 3. A tiny retrain from the pool registers a candidate (1 step at a tiny learning rate: the
            #    candidate is a new version whose contours are those of its parent, so the routes below stay).
            rc = main(
                [
                    "train",
                    "segmenter",
                    "--pool",
                    "--data",
                    str(base),
                    "--out",
                    str(tmp_path / "candidate"),
                    "--fine-tune-steps",
                    "1",
                    "--fine-tune-lr",
                    "1e-6",
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
            new = candidate["version"]
            assert status_of(rows, "segmenter") == {shipped_segmenter: "active", new: "candidate"}
            assert candidate["registered_by"] == "trainer" and candidate["metrics"]["trained_steps"] == 1
            training = candidate["training_data"]
            assert training["parent_version"] == shipped_segmenter and training["pool_series"] == 1
            assert training["pool_entry_ids"] == [entry.id] and training["pool_source"] == "database"

            # 4. Promoted: the next series is scored by the active detector and segmented by the candidate.
            assert main(["models", "promote", "segmenter", new, "--by", "qa"]) == 0
            assert status_of(models_list(capsys), "segmenter") == {shipped_segmenter: "retired", new: "active"}
            second = clone_series(normal, tmp_path / "second", SLICES)
            sent = storescu(settings.port, second)
            assert sent.returncode == 0, sent.stdout[-2000:] + sent.stderr[-2000:]
            after_promotion = delivered(db, pacs, settings, series_uid(second[0].parent), alive=alive)
            assert after_promotion.score.model_version == shipped_detector and not after_promotion.score.flagged
            assert after_promotion.series.route == "auto" and after_promotion.events.routes == ["auto"]
            assert after_promotion.events.detector_versions == {shipped_detector}
            assert after_promotion.events.segmenter_versions == {new}
            assert after_promotion.seg_versions == {new[:64]}

            # 5. Rolled back: the next series is segmented by the shipped version again.
            assert main(["models", "rollback", "segmenter", "--by", "qa"]) == 0
            assert status_of(models_list(capsys), "segmenter") == {shipped_segmenter: "active", new: "retired"}
            third = clone_series(normal, tmp_path / "third", SLICES)
            sent = storescu(settings.port, third)
            assert sent.returncode == 0, sent.stdout[-2000:] + sent.stderr[-2000:]
            after_rollback = delivered(db, pacs, settings, series_uid(third[0].parent), alive=alive)
            assert after_rollback.score.model_version == shipped_detector and not after_rollback.score.flagged
            assert after_rollback.series.route == "auto" and after_rollback.events.routes == ["auto"]
            assert after_rollback.events.detector_versions == {shipped_detector}
            assert after_rollback.events.segmenter_versions == {shipped_segmenter}
            assert after_rollback.seg_versions == {shipped_segmenter[:64]}

            # 6. A malformed RT Structure Set and one for a series we never received, through Orthanc.
            malformed = renewed(rtstruct, tmp_path / "malformed.dcm", break_contour)
            unknown = renewed(rtstruct, tmp_path / "unknown.dcm", elsewhere)
            send_through_orthanc(pacs, [malformed, unknown])

            def contours_settled() -> bool:
                alive()
                with db.sessions() as session:
                    statuses = list(session.scalars(select(ContourObject.status)))
                return len(statuses) == 3 and "pending" not in statuses

            wait_for(contours_settled, WAIT_S, 0.5)
            listed = {row["sop_instance_uid"]: row for row in gatekeeper_json(["contours", "list", "--json"], capsys)}
            uid = {p.stem: str(pydicom.dcmread(p).SOPInstanceUID) for p in (malformed, unknown)}
            assert set(listed) == {rtstruct_uid, *uid.values()}
            assert {row["calling_ae_title"] for row in listed.values()} == {"ORTHANC"}
            assert listed[rtstruct_uid]["status"] == "matched"
            assert listed[rtstruct_uid]["matched_series_instance_uid"] == flagged.series_instance_uid
            assert listed[uid["malformed"]]["status"] == "unreadable"
            assert "cannot rasterise ROI 'Liver'" in listed[uid["malformed"]]["reason"]
            assert listed[uid["unknown"]]["status"] == "unmatched"
            assert listed[uid["unknown"]]["reason"] == f"refers to series {UNKNOWN_SERIES}, which we never received"
            [still_pooled] = gatekeeper_json(["pool", "list", "--json"], capsys)
            assert still_pooled["contour_sop_instance_uid"] == rtstruct_uid

            # The PACS holds the three contour objects and the two delivered SEGs; the flagged series sent nothing.
            assert len(pacs.rest("/instances")) == 5
            with db.sessions() as session:
                assert session.scalars(select(Export).where(Export.series_id == flagged_row.id)).all() == []

            # ... nothing crashed, and the listener still accepts associations and instances.
            alive()
            assert echoscu(settings.port).returncode == 0
            echo = urllib.request.Request(f"http://127.0.0.1:{pacs.http_port}/modalities/gatekeeper/echo", b"{}")
            with urllib.request.urlopen(echo, timeout=60) as answer:
                assert answer.status == 200  # Orthanc's C-ECHO to our listener succeeded
            last = clone_series(normal, tmp_path / "last", 4)
            sent = storescu(settings.port, last)
            assert sent.returncode == 0, sent.stdout[-2000:] + sent.stderr[-2000:]
            wait_for(lambda: state(series_uid(last[0].parent)) not in (None, SeriesState.RECEIVING), WAIT_S, 0.5)
            assert state(flagged.series_instance_uid) == SeriesState.CONTOURED
    logs = "".join(p.read_text() for p in (tmp_path / "listener.log", tmp_path / "worker.log"))
    assert "Traceback" not in logs
    broker = redis.Redis.from_url(redis_url)
    for name in (settings.score_queue, settings.segment_queue, settings.export_queue, settings.pipeline_queue):
        broker.delete(name)
    db.close()
