"""Real-world header defects, each on a copy of a real CT file: the commands, the listener and the pipeline.

- An empty (or unknown) Specific Character Set, over-long strings, names without "^", malformed dates and
  missing Type 2 attributes in the source: the SEG and the RT Structure Set are still valid (dciodvfy).
- An empty data set SOP Class UID (the file meta has it): the commands use the file meta's.
- Stripped SOP Instance / Series Instance UIDs: `gatekeeper segment` names the file and the attribute
  (exit 2, one line); the listener refuses the instance with 0xA900 naming the attribute, logs it
  without patient data and keeps nothing of it.
- A real series whose SEG cannot be built (its Frame of Reference UID stripped): the pipeline puts it
  on the worklist at once with the reason in words, never a stage error retried into "unreadable".
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from ingest_support import Db, make_settings, running_listener, storescu, upgrade, wait_for
from pynetdicom import AE, _config
from realct_support import copy_series, dciodvfy_errors, realct_case
from sqlalchemy import select

from service import dicom_series, pipeline
from service.commands.main import main
from service.db.tables import Instance, WorklistItem
from service.dicom_rtstruct import build_liver_rtstruct
from service.dicom_seg import build_liver_seg
from service.lifecycle import SeriesState
from service.settings import Settings

pytestmark = pytest.mark.integration

ALGORITHM = {"algorithm_name": "CT Gatekeeper liver U-Net", "algorithm_version": "test-1"}


def box_mask(headers: list[pydicom.Dataset]) -> np.ndarray:
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    mask = np.zeros((len(headers), rows, columns), bool)
    mask[:, rows // 3 : rows // 2, columns // 4 : columns // 2] = True
    return mask


def headers_of(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]


# --- derived objects from defective headers -------------------------------------------------------------


def test_empty_specific_character_set_of_a_real_ct_gives_a_valid_seg(tmp_path: Path) -> None:
    """The issue's traceback: `gatekeeper segment` on a real CT whose (0008,0005) is present but empty."""

    def blank(ds: pydicom.Dataset) -> None:
        ds.SpecificCharacterSet = ""

    ct = copy_series(realct_case("siemens-j2k-20") / "ct", tmp_path / "ct", blank)
    assert pydicom.dcmread(next(ct.glob("*.dcm"))).SpecificCharacterSet == ""
    out = tmp_path / "seg.dcm"
    assert main(["segment", str(ct), "--out", str(out)]) == 0
    assert dciodvfy_errors(out) == []
    seg = pydicom.dcmread(out)
    assert seg.get("SpecificCharacterSet", "") != "" or "SpecificCharacterSet" not in seg
    assert (
        seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(next(ct.glob("*.dcm"))).SeriesInstanceUID
    )


def test_odd_header_values_of_a_real_ct_give_a_valid_seg_and_rtstruct(tmp_path: Path) -> None:
    """Unknown character set, over-long strings, names without "^", a dashed date, a sex spelled out, a
    line break in a one-line string, missing Type 2 attributes."""

    def damage(ds: pydicom.Dataset) -> None:
        ds.SpecificCharacterSet = "ISO_IR 999"  # no such repertoire
        ds.PatientName = "DOE JANE"
        ds.ReferringPhysicianName = "DR SMITH"
        ds.PatientID = "P" * 80  # LO: at most 64
        ds.AccessionNumber = "A" * 30  # SH: at most 16
        ds.StudyDescription = "ABDOMEN\r\n" + "S" * 90  # LO: one line, at most 64
        ds.StudyDate = "2022-12-08"  # DA written with dashes
        ds.PatientSex = "Female"  # CS, enumerated M / F / O
        del ds.PatientBirthDate, ds.StudyID  # Type 2, absent

    ct = copy_series(realct_case("slab-3mm-30") / "ct", tmp_path / "ct", damage)
    headers = headers_of(ct)
    seg = build_liver_seg(source_images=headers, mask=box_mask(headers), source_series_version=1, **ALGORITHM)
    rtstruct = build_liver_rtstruct(source_images=headers, mask=box_mask(headers), source_series_version=1, **ALGORITHM)
    for name, derived in (("seg.dcm", seg), ("rtstruct.dcm", rtstruct)):
        path = tmp_path / name
        derived.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], name
        back = pydicom.dcmread(path)
        assert str(back.PatientName) == "DOE JANE^" and str(back.ReferringPhysicianName) == "DR SMITH^"
        assert back.PatientID == "P" * 64 and back.AccessionNumber == "A" * 16
        assert back.StudyDate == "20221208" and back.StudyID == "" and back.PatientBirthDate == ""
        assert back.PatientSex == "" and back.StudyDescription == ("ABDOMEN  " + "S" * 90)[:64]
        assert "SpecificCharacterSet" not in back  # every value is ASCII: the default repertoire
    assert str(headers[0].PatientName) == "DOE JANE"  # the sources are not changed


def test_non_ascii_names_under_an_empty_character_set_are_kept_in_utf8(tmp_path: Path) -> None:
    def latin1(ds: pydicom.Dataset) -> None:
        ds.PatientName = "MÜLLER^JOSÉ"  # written in ISO_IR 100 (the file's declaration)

    ct = copy_series(realct_case("slab-3mm-30") / "ct", tmp_path / "ct", latin1)
    headers = headers_of(ct)
    for ds in headers:  # then the declaration is lost, as in the export
        ds.SpecificCharacterSet = ""
    seg = build_liver_seg(source_images=headers, mask=box_mask(headers), source_series_version=1, **ALGORITHM)
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(path)
    assert back.SpecificCharacterSet == "ISO_IR 192" and str(back.PatientName) == "MÜLLER^JOSÉ"


def test_empty_data_set_sop_class_uid_is_taken_from_the_file_meta(tmp_path: Path) -> None:
    def no_class(ds: pydicom.Dataset) -> None:
        ds.SOPClassUID = ""  # the file meta's Media Storage SOP Class UID stays

    ct = copy_series(realct_case("slab-3mm-30") / "ct", tmp_path / "ct", no_class)
    [group] = dicom_series.ct_series_in(dicom_series.scan_tree_strict(ct))
    series = dicom_series.load_series(group)
    assert series.num_slices == 30
    headers = [pydicom.dcmread(i.path, stop_before_pixels=True) for i in group.instances]
    seg = build_liver_seg(source_images=headers, mask=box_mask(headers), source_series_version=1, **ALGORITHM)
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    assert dciodvfy_errors(path) == []
    references = pydicom.dcmread(path).ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert {r.ReferencedSOPClassUID for r in references} == {"1.2.840.10008.5.1.4.1.1.2"}  # CT Image Storage


# --- the command names the file and the attribute ---------------------------------------------------------


@pytest.mark.parametrize(("keyword", "tag"), [("SeriesInstanceUID", "(0020,000E)"), ("SOPInstanceUID", "(0008,0018)")])
def test_segment_names_the_file_whose_uid_an_anonymiser_stripped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keyword: str, tag: str
) -> None:
    ct = copy_series(realct_case("slab-3mm-30") / "ct", tmp_path / "ct")
    damaged = ct / "CT0007.dcm"
    dataset = pydicom.dcmread(damaged)
    delattr(dataset, keyword)
    dataset.save_as(damaged)
    assert main(["segment", str(ct), "--out", str(tmp_path / "seg.dcm")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(damaged) in err and f"{keyword} {tag} is missing or empty" in err
    assert not (tmp_path / "seg.dcm").exists()


# --- the listener refuses half-identified instances -------------------------------------------------------


@pytest.fixture
def listener_env(tmp_path: Path, postgres_db_url: str, redis_url: str) -> Iterator[tuple[Settings, Db]]:
    upgrade(postgres_db_url)
    settings = make_settings(tmp_path / "var", postgres_db_url, redis_url)
    db = Db(postgres_db_url)
    yield settings, db
    db.close()


def send_file(port: int, path: Path, monkeypatch: pytest.MonkeyPatch) -> pydicom.Dataset:
    """C-STORE one file as a PACS would: its SOP Class and Instance UID from the file meta, the data set as stored."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # pynetdicom then reads the UIDs from the meta
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEKEEPER")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    return status


@pytest.mark.parametrize(
    ("keyword", "tag"),
    [("SOPClassUID", 0x00080016), ("SOPInstanceUID", 0x00080018), ("SeriesInstanceUID", 0x0020000E)],
)
def test_listener_refuses_an_instance_without_its_uid_and_keeps_nothing(
    tmp_path: Path,
    listener_env: tuple[Settings, Db],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    keyword: str,
    tag: int,
) -> None:
    settings, db = listener_env
    source = realct_case("slab-3mm-30") / "ct" / "CT0001.dcm"
    dataset = pydicom.dcmread(source)
    setattr(dataset, keyword, "")  # the file meta still names the class and the instance
    path = tmp_path / "stripped.dcm"
    dataset.save_as(path)
    with caplog.at_level(logging.WARNING), running_listener(settings, run_assembler=False) as listener:
        status = send_file(listener.port, path, monkeypatch)
    assert status.Status == 0xA900  # Failure: Data Set does not match SOP Class
    assert keyword in status.ErrorComment and status.OffendingElement == tag
    [line] = [r.getMessage() for r in caplog.records if "refused instance" in r.getMessage()]
    assert keyword in line and str(dataset.PatientName) not in line and dataset.PatientID not in line
    assert db.series() == []
    stored = [p for p in settings.storage_dir.rglob("*") if p.is_file() and p.suffix == ".dcm"]
    assert stored == []


def test_listener_refuses_a_stripped_series_uid_sent_by_storescu(
    tmp_path: Path, listener_env: tuple[Settings, Db]
) -> None:
    settings, db = listener_env

    def no_series(ds: pydicom.Dataset) -> None:
        ds.SeriesInstanceUID = ""

    ct = copy_series(realct_case("siemens-j2k-20") / "ct", tmp_path / "ct", no_series)
    with running_listener(settings, run_assembler=False) as listener:
        result = storescu(listener.port, sorted(ct.glob("*.dcm"))[:2], "-xv", "--no-halt")
    output = result.stdout + result.stderr
    assert output.count("Received Store Response (Error: DataSetDoesNotMatchSOPClass)") == 2, output
    assert db.series() == []


# --- the pipeline: a readable series whose SEG cannot be built --------------------------------------------


def test_real_series_whose_seg_cannot_be_built_goes_to_the_worklist_with_the_reason(tmp_path: Path) -> None:
    """Frame of Reference UID stripped: readable and segmentable, but no SEG can reference it.

    A gate that lets the series through (the route this test is about: auto, where the SEG is built);
    the segmenter is the shipped one.
    """
    from test_pipeline import RecordingPublisher

    from service.gate import Gate, GateDecision

    class Passing(Gate):
        def assess(self, **kwargs: Any) -> Any:
            assessment = Gate.rules_only().assess(**kwargs)
            assessment.decision = GateDecision(False, None, (), None, None, "gate-test-pass")
            return assessment

    from service.commands.score import DEFAULT_MODEL_DIR
    from service.inference import Detector
    from service.segmentation import DEFAULT_MODEL_DIR as SEGMENTER_DIR
    from service.segmentation import Segmenter

    def no_frame_of_reference(ds: pydicom.Dataset) -> None:
        del ds.FrameOfReferenceUID

    ct = copy_series(realct_case("slab-3mm-30") / "ct", tmp_path / "ct", no_frame_of_reference)
    url = f"sqlite:///{tmp_path / 'gatekeeper.db'}"
    upgrade(url)
    settings = make_settings(tmp_path / "var", url, "memory://", quiet_period_s=0.5)
    db = Db(url)
    with running_listener(settings, publisher=RecordingPublisher()) as listener:
        assert storescu(listener.port, sorted(ct.glob("*.dcm"))).returncode == 0
        [series] = wait_for(lambda: [s for s in db.series() if s.state == SeriesState.QUEUED], timeout=60)
    pipeline.start(sessions=db.sessions, series_id=series.id, worker="test")
    pipeline.score(
        sessions=db.sessions, settings=settings, series_id=series.id, detector=Detector(DEFAULT_MODEL_DIR, batch=8)
    )
    assert db.series()[0].state == SeriesState.SEGMENTING
    assert (
        pipeline.segment(
            sessions=db.sessions,
            settings=settings,
            series_id=series.id,
            segmenter=Segmenter(SEGMENTER_DIR),
            gate=Passing({"version": "gate-test-pass"}),
        )
        == []
    )
    [row] = db.series()
    assert (row.state, row.route, row.route_reason) == (SeriesState.WORKLISTED, "worklist", "cannot_segment")
    with db.sessions() as session:
        [item] = session.scalars(select(WorklistItem)).all()
        assert session.scalar(select(Instance.id).limit(1)) is not None
    assert item.reason == "cannot_segment"
    assert "could not be built from the series' headers" in item.detail["problem"]
    assert "FrameOfReferenceUID" in item.detail["problem"]
    db.close()
