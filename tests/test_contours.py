"""Returned contours and the training pool (`service.contours`, the pipeline's contour stage).

- Unit: the liver name map, and the rasterisers on a phantom series (an RT Structure Set made from
  the ground truth with rt-utils; the phantom's own ground-truth SEG).
- SQLite, in process: three worklisted series get their RTSTRUCT through the real listener,
  `queue_contours` + `match_contours` pool them, `gatekeeper pool export` writes a folder that
  `gatekeeper train segmenter --data` trains on (2 steps).
- Integration, real everything (PostgreSQL, Redis, `gatekeeper listen` and `gatekeeper worker` in
  their own processes, DCMTK storescu): a series routed to the worklist (a missing slice: geometry),
  its ground-truth RTSTRUCT sent back → pool, `contoured`, Dice ≥ 0.95; a malformed RTSTRUCT and one
  for an unknown series listed with their reasons; a second contour supersedes the first.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from ingest_support import (
    Db,
    ct_files,
    gatekeeper_executable,
    listener_process,
    make_settings,
    running_listener,
    settings_env,
    storescu,
    upgrade,
    wait_for,
)
from pydicom.uid import generate_uid
from sqlalchemy import select
from web_support import PageClient, login, serve

from service import contours, pipeline
from service.db.tables import ContourObject, ContourStatus, PoolEntry, WorklistItem, WorklistStatus
from service.lifecycle import SeriesState, transition
from service.phantom.truth import load_manifest, load_series
from service.settings import Settings, get_settings, settings_environment
from service.web import crud
from service.web.app import create_app

DEFAULT_NAMES: list[str] = Settings.model_fields["liver_structure_names"].get_default(call_default_factory=True)


# --- helpers ----------------------------------------------------------------------------------------


@dataclass
class Phantom:
    """One phantom series: its CT files and the ground-truth liver by CT SOP Instance UID."""

    folder: Path
    liver: dict[str, np.ndarray]

    @property
    def series_instance_uid(self) -> str:
        return str(pydicom.dcmread(ct_files(self.folder)[0], stop_before_pixels=True).SeriesInstanceUID)


def make_phantoms(out: Path, *, series: int, seed: int, slices: int, matrix: int) -> list[Phantom]:
    """`gatekeeper phantom` series (seeds chosen so that each shows the liver) and their truth."""
    from service.commands.main import main

    command = ["phantom", "--out", str(out), "--series", str(series), "--slices", str(slices)]
    assert main([*command, "--seed", str(seed), "--matrix", str(matrix), "--quiet"]) == 0
    phantoms = []
    for entry in load_manifest(out)["series"]:
        truth = load_series(out, entry)
        liver = truth.labels == 1
        assert liver.sum() > 300, "the phantom series must show the liver"
        phantoms.append(Phantom(out / entry["folder"], dict(zip(truth.sop_instance_uids, liver, strict=True))))
    return phantoms


def make_rtstruct(
    phantom: Phantom, out: Path, *, roi_names: tuple[str, ...] = ("Liver",), files: list[Path] | None = None
) -> Path:
    """An RT Structure Set made with rt-utils from the ground-truth liver (every ROI gets that mask)."""
    from rt_utils import RTStructBuilder

    work = out.with_suffix(".ct")
    work.mkdir(parents=True)
    for path in files or ct_files(phantom.folder):
        shutil.copy(path, work / path.name)
    rtstruct = RTStructBuilder.create_new(dicom_series_path=str(work))
    mask = np.stack([phantom.liver[str(ds.SOPInstanceUID)] for ds in rtstruct.series_data], axis=-1)
    for name in roi_names:
        rtstruct.add_roi(mask=mask, name=name)
    rtstruct.save(str(out))
    shutil.rmtree(work)
    return out


def renewed(path: Path, out: Path, change: Any = None) -> Path:
    """A copy of a contour object with new SOP Instance and Series UIDs, changed by `change(ds)`."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if change is not None:
        change(ds)
    ds.save_as(out, enforce_file_format=True)
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def truth_volume(phantom: Phantom, sop_instance_uids: tuple[str, ...] | list[str]) -> np.ndarray:
    return np.stack([phantom.liver[uid] for uid in sop_instance_uids])


# --- unit: the name map and the rasterisers ---------------------------------------------------------


def test_the_liver_name_map_ignores_letter_case_and_blanks_and_prefers_its_own_order() -> None:
    assert contours.liver_structure(["GTV", " LIVER "], DEFAULT_NAMES) == " LIVER "
    assert contours.liver_structure(["Spleen", "liver_MANUAL"], DEFAULT_NAMES) == "liver_MANUAL"
    assert contours.liver_structure(["Liver_manual", "Liver"], ["Liver_manual", "Liver"]) == "Liver_manual"
    assert contours.liver_structure(["Liver_manual", "Liver"], ["Liver", "Liver_manual"]) == "Liver"
    assert contours.liver_structure(["Liver  manual"], ["liver manual"]) == "Liver  manual"
    assert contours.liver_structure(["Livers", "Liver 2", "PTV_liver"], DEFAULT_NAMES) is None
    assert contours.liver_structure([], DEFAULT_NAMES) is None


def test_the_name_map_comes_from_the_environment_and_is_never_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEKEEPER_LIVER_STRUCTURE_NAMES", "Leber_manuell, LIVER_TPS")
    assert Settings().liver_structure_names == ["Leber_manuell", "LIVER_TPS"]
    monkeypatch.setenv("GATEKEEPER_LIVER_STRUCTURE_NAMES", " , ")
    with pytest.raises(ValueError, match="liver_structure_names"):
        Settings()
    assert {"liver", "Liver", "LIVER", "Liver_manual"} <= set(DEFAULT_NAMES)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Phantom:
    [one] = make_phantoms(tmp_path_factory.mktemp("contour-phantom"), series=1, seed=5, slices=14, matrix=96)
    return one


def test_an_rtstruct_of_the_ground_truth_rasterises_back_onto_the_ct(phantom: Phantom, tmp_path: Path) -> None:
    headers = contours.ct_headers(ct_files(phantom.folder))
    uids = [str(h.SOPInstanceUID) for h in headers]
    rtstruct = pydicom.dcmread(make_rtstruct(phantom, tmp_path / "rt.dcm", roi_names=("Spleen", "LIVER")))
    name, mask = contours.rasterise(rtstruct, headers, DEFAULT_NAMES)
    assert name == "LIVER" and mask.shape == (14, 96, 96)
    assert dice(mask, truth_volume(phantom, uids)) >= 0.95

    # Contour Image Sequence is optional: contours without it are placed by their plane.
    for roi_contour in rtstruct.ROIContourSequence:
        for contour in roi_contour.ContourSequence:
            del contour.ContourImageSequence
    _, placed = contours.rasterise(rtstruct, headers, DEFAULT_NAMES)
    assert np.array_equal(placed, mask)


def test_the_phantoms_ground_truth_seg_rasterises_by_segment_label(phantom: Phantom) -> None:
    headers = contours.ct_headers(ct_files(phantom.folder))
    seg = pydicom.dcmread(phantom.folder / "ground_truth" / "organs.seg.dcm")
    name, mask = contours.rasterise(seg, headers, DEFAULT_NAMES)
    assert name == "Liver"
    assert np.array_equal(mask, truth_volume(phantom, [str(h.SOPInstanceUID) for h in headers]))
    name, by_code = contours.rasterise(seg, headers, ["Leber"])  # no label matches: its SCT code does
    assert name == "Liver" and np.array_equal(by_code, mask)


def test_unusable_rtstructs_end_with_their_reason(phantom: Phantom, tmp_path: Path) -> None:
    headers = contours.ct_headers(ct_files(phantom.folder))
    path = make_rtstruct(phantom, tmp_path / "rt.dcm", roi_names=("Spleen",))
    with pytest.raises(contours.ContourProblem, match="no ROI named like the liver") as problem:
        contours.rasterise(pydicom.dcmread(path), headers, DEFAULT_NAMES)
    assert problem.value.status == ContourStatus.NO_LIVER and "Spleen" in problem.value.reason

    ds = pydicom.dcmread(path)
    ds.ROIContourSequence[0].ContourSequence[0].ContourData = [1.0, 2.0]  # not x/y/z triplets
    with pytest.raises(contours.ContourProblem, match="cannot rasterise ROI 'Spleen'") as problem:
        contours.rasterise(ds, headers, ["spleen"])
    assert problem.value.status == ContourStatus.UNREADABLE

    ds = pydicom.dcmread(path)
    for contour in ds.ROIContourSequence[0].ContourSequence:  # drawn 500 mm away from every slice
        del contour.ContourImageSequence
        points = np.asarray(contour.ContourData, float).reshape(-1, 3)
        points[:, 2] += 500
        contour.ContourData = [round(float(v), 3) for v in points.ravel()]
    with pytest.raises(contours.ContourProblem, match="no liver voxel") as problem:
        contours.rasterise(ds, headers, ["spleen"])
    assert problem.value.status == ContourStatus.EMPTY


# --- SQLite: contour stage in process, export, two training steps ------------------------------------


class RecordingPublisher:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    def publish(self, nxt: Any, **kwargs: Any) -> None:
        self.messages.append(nxt)


def worklist(db: Db, series_id: int) -> None:
    """Move an ingested (queued) series version onto the worklist, as the pipeline's route does."""
    with db.sessions.begin() as session:
        for source, target in (
            (SeriesState.QUEUED, SeriesState.SCORING),
            (SeriesState.SCORING, SeriesState.WORKLISTED),
        ):
            assert transition(session=session, series_id=series_id, source=source, target=target)
        session.add(WorklistItem(series_id=series_id, reason="anomaly", detail={}, status="open"))


def test_pooled_contours_export_to_a_folder_the_segmenter_trains_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.commands.main import main

    phantoms = make_phantoms(tmp_path / "phantoms", series=3, seed=11, slices=10, matrix=64)
    url = f"sqlite:///{tmp_path / 'gatekeeper.db'}"
    upgrade(url)
    settings = make_settings(tmp_path / "var", url, "memory://", quiet_period_s=0.3, web_secret_key="k" * 40)
    db = Db(url)
    publisher = RecordingPublisher()
    with running_listener(settings, publisher=publisher) as listener:
        for p in phantoms:
            assert storescu(listener.port, ct_files(p.folder)).returncode == 0
        wait_for(lambda: len([s for s in db.series() if s.state == SeriesState.QUEUED]) == 3, 60)
        ids = {s.series_instance_uid: s.id for s in db.series()}
        for p in phantoms:
            worklist(db, ids[p.series_instance_uid])
        objects = [make_rtstruct(p, tmp_path / f"rt{i}.dcm") for i, p in enumerate(phantoms)]
        assert storescu(listener.port, objects).returncode == 0
        wait_for(lambda: len([s for s in db.series() if s.state == SeriesState.STORED]) == 3, 60)
    stored = sorted(s.id for s in db.series() if s.state == SeriesState.STORED)
    assert pipeline.queue_contours(sessions=db.sessions, settings=settings, publisher=publisher) == stored
    assert pipeline.queue_contours(sessions=db.sessions, settings=settings, publisher=publisher) == []  # claimed
    for series_id in stored:
        assert pipeline.match_contours(sessions=db.sessions, settings=settings, series_id=series_id) == pipeline.DONE
    assert [s.state for s in db.series() if s.state != SeriesState.STORED] == [SeriesState.CONTOURED] * 3
    with db.sessions() as session:
        assert [i.status for i in session.scalars(select(WorklistItem))] == [WorklistStatus.CONTOURED] * 3
        entries = list(session.scalars(select(PoolEntry)))
    assert len(entries) == 3
    for entry in entries:
        pool_mask = contours.load_pool_mask(settings=settings, entry=entry)
        [p] = [p for p in phantoms if p.series_instance_uid == entry.series_instance_uid]
        assert dice(pool_mask.liver, truth_volume(p, pool_mask.sop_instance_uids)) >= 0.95
        assert entry.calling_ae_title == "STORESCU" and entry.liver_voxels == int(pool_mask.liver.sum())

    # The worklist shows the contoured items as such, and nobody can claim them any more.
    with db.sessions() as session:
        crud.create_user(session=session, name="dana", role="dosimetrist", password="dana-password")
    with serve(create_app(settings, db.sessions)) as base_url:
        client = httpx.Client(base_url=base_url, auth=("dana", "dana-password"), timeout=30)
        listed = client.get("/api/worklist", params={"status": "contoured"}).json()
        assert sorted(e["series_instance_uid"] for e in listed) == sorted(p.series_instance_uid for p in phantoms)
        assert {e["status"] for e in listed} == {"contoured"}
        browser = PageClient(base_url, timeout=30)  # pages take the login cookie, never basic auth
        assert login(browser, "dana", "dana-password").status_code in (200, 303)
        page = browser.get("/worklist", params={"status": "contoured"})
        assert page.status_code == 200 and page.text.count("returned contour in the training pool") == 3
        refused = browser.post(f"/api/worklist/{listed[0]['id']}/claim")
        assert refused.status_code == 409 and "its contour came back" in refused.json()["detail"]

    monkeypatch.setenv("GATEKEEPER_DATABASE_URL", url)
    monkeypatch.setenv("GATEKEEPER_STORAGE_DIR", str(settings.storage_dir))
    get_settings.cache_clear()
    export = tmp_path / "export"
    assert main(["pool", "export", str(export)]) == 0
    manifest = json.loads((export / "pool.json").read_text())
    assert manifest["pool_export_version"] == 1 and len(manifest["entries"]) == 3
    for item in manifest["entries"]:
        assert len(list((export / item["folder"] / "ct").glob("*.dcm"))) == 10
        seg = pydicom.dcmread(export / item["folder"] / "liver.seg.dcm")
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == item["series_instance_uid"]
        assert seg.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"
    assert main(["pool", "export", str(export)]) == 2  # not an empty folder: one line, exit 2

    model = tmp_path / "model"
    args = ["--size", "32", "--base", "4", "--steps", "2", "--batch", "2", "--val-every", "1"]
    args += ["--seed", "3", "--jobs", "1", "--threads", "1", "--no-progress"]
    assert main(["train", "segmenter", "--data", str(export), "--out", str(model), *args]) == 0
    assert (model / "model.json").is_file()
    get_settings.cache_clear()
    db.close()


# --- integration: real listener, worker, PostgreSQL, Redis ------------------------------------------


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


def gatekeeper_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    """`gatekeeper ARGS` run in this process (the settings come from the environment); its JSON output."""
    from service.commands.main import main

    capsys.readouterr()
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.integration
@pytest.mark.slow
def test_a_returned_rtstruct_pools_the_worklisted_series_and_bad_ones_are_listed_with_reasons(
    tmp_path: Path,
    postgres_db_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upgrade(postgres_db_url)
    [phantom] = make_phantoms(tmp_path / "phantom", series=1, seed=5, slices=20, matrix=128)
    files = ct_files(phantom.folder)
    del files[10]  # a missing slice: ingest's geometry check sends the series to the worklist
    settings = make_settings(tmp_path / "var", postgres_db_url, redis_url, quiet_period_s=1.0)
    db = Db(postgres_db_url)
    for name, value in settings_environment(settings).items():  # for the commands run in this process
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()

    def ct_row() -> Any:
        [row] = db.series(phantom.series_instance_uid)
        return row

    def contour_rows() -> list[ContourObject]:
        with db.sessions() as session:
            return list(session.scalars(select(ContourObject).order_by(ContourObject.id)))

    with (
        listener_process(settings, tmp_path / "listener.log"),
        process(
            [gatekeeper_executable(), "worker", "--queues", "score,segment,default"], settings, tmp_path / "worker.log"
        ),
    ):
        sent = storescu(settings.port, files)
        assert sent.returncode == 0, sent.stderr[-2000:]
        wait_for(lambda: db.series(phantom.series_instance_uid) and ct_row().state == SeriesState.WORKLISTED, 180, 0.5)
        assert ct_row().route_reason == "geometry"

        first = make_rtstruct(phantom, tmp_path / "first.dcm", files=files)
        assert storescu(settings.port, [first]).returncode == 0
        wait_for(lambda: ct_row().state == SeriesState.CONTOURED, 120, 0.5)
        [pooled] = gatekeeper_json(["pool", "list", "--json"], capsys)
        assert pooled["series_instance_uid"] == phantom.series_instance_uid
        assert pooled["contour_sop_instance_uid"] == str(pydicom.dcmread(first).SOPInstanceUID)
        assert pooled["calling_ae_title"] == "STORESCU" and pooled["structure_name"] == "Liver"
        with db.sessions() as session:
            entry = session.scalars(select(PoolEntry)).one()
            item = session.scalars(select(WorklistItem)).one()
        pool_mask = contours.load_pool_mask(settings=settings, entry=entry)
        assert len(pool_mask.sop_instance_uids) == 19
        assert dice(pool_mask.liver, truth_volume(phantom, pool_mask.sop_instance_uids)) >= 0.95
        assert item.status == WorklistStatus.CONTOURED

        def break_contour(ds: pydicom.Dataset) -> None:
            ds.ROIContourSequence[0].ContourSequence[0].ContourData = [1.0, 2.0]

        def elsewhere(ds: pydicom.Dataset) -> None:
            frame = ds.ReferencedFrameOfReferenceSequence[0]
            frame.FrameOfReferenceUID = ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID = generate_uid()
            [rt_series] = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence
            rt_series.SeriesInstanceUID = "1.2.826.0.1.3680043.10.543.999"
            for image in rt_series.ContourImageSequence:
                image.ReferencedSOPInstanceUID = generate_uid()
            for contour in ds.ROIContourSequence[0].ContourSequence:
                contour.ContourImageSequence[0].ReferencedSOPInstanceUID = generate_uid()

        def second_opinion(ds: pydicom.Dataset) -> None:
            ds.StructureSetROISequence[0].ROIName = "Liver_manual"

        malformed = renewed(first, tmp_path / "malformed.dcm", break_contour)
        unknown = renewed(first, tmp_path / "unknown.dcm", elsewhere)
        second = renewed(first, tmp_path / "second.dcm", second_opinion)
        assert storescu(settings.port, [malformed, unknown, second]).returncode == 0
        wait_for(lambda: len(contour_rows()) == 4 and all(c.status != "pending" for c in contour_rows()), 120, 0.5)

    listed = {row["sop_instance_uid"]: row for row in gatekeeper_json(["contours", "list", "--json"], capsys)}
    uid = {path.stem: str(pydicom.dcmread(path).SOPInstanceUID) for path in (first, malformed, unknown, second)}
    assert listed[uid["first"]]["status"] == "superseded"
    assert listed[uid["first"]]["reason"] == f"superseded by the later contour {uid['second']}"
    assert listed[uid["second"]]["status"] == "matched" and listed[uid["second"]]["structure_name"] == "Liver_manual"
    assert listed[uid["second"]]["matched_series_instance_uid"] == phantom.series_instance_uid
    assert listed[uid["malformed"]]["status"] == "unreadable"
    assert "cannot rasterise ROI 'Liver'" in listed[uid["malformed"]]["reason"]
    assert listed[uid["unknown"]]["status"] == "unmatched"
    assert listed[uid["unknown"]]["reason"] == (
        "refers to series 1.2.826.0.1.3680043.10.543.999, which we never received"
    )
    [current] = gatekeeper_json(["pool", "list", "--json"], capsys)
    assert current["contour_sop_instance_uid"] == uid["second"]
    both = gatekeeper_json(["pool", "list", "--json", "--all"], capsys)
    assert [(e["contour_sop_instance_uid"], e["superseded"]) for e in both] == [
        (uid["first"], True),
        (uid["second"], False),
    ]
    assert ct_row().state == SeriesState.CONTOURED
    assert db.event_kinds(ct_row().id)[-2:] == ["contoured", "contoured"]
    logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert "Traceback" not in logs
    assert ct_row().patient_name and ct_row().patient_name not in logs
    get_settings.cache_clear()
    db.close()
