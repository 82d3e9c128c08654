"""Conformance corpus: real CT files received by the listener in every transfer syntax it accepts, read, segmented.

The corpus: the CT files of `pydicom-data` (real scanner output: CT in JPEG 2000, explicit VR, JPEG
Lossless with a broken sequence, VR UN elements; an Enhanced CT) and the two real series of
`../shared/realct/`. One listener serves the whole module (SQLite, no assembler); DCMTK storescu is the
sender, proposing one transfer syntax per association.

1. As published: every file is sent in its own encoding. Each one is stored or refused with a status
   and a comment that name the reason; each stored series is read by `load_series` or refused with a
   `SeriesError` that names the problem.
2. Every accepted transfer syntax: the pydicom-data CT image and every slice of each real series,
   re-encoded in each of the 8 syntaxes (DCMTK's converters or pydicom) as a series of their own (the
   full cross product: 51 images × 8 syntaxes, about 30 s to encode and send here). Each is stored;
   the lossless ones read back to exactly the HU of the source, lossy JPEG 2000 to within a few HU;
   the one-slice series is refused by name.
3. Each real CT series as published, and its JPEG 2000 lossless and lossy re-encodings, is segmented
   by the shipped segmenter and its SEG and RT Structure Set pass dciodvfy with 0 errors. The other
   re-encodings are not segmented again, for runtime: test 2 shows they give the very same HU.

No traceback anywhere: every log record of the module is collected and none carries an exception.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from ingest_support import Db, make_settings, running_listener, storescu, upgrade
from pydicom.uid import JPEG2000, JPEG2000Lossless, generate_uid
from realct_support import REALCT_CASES, dciodvfy_errors, pydicom_data_dir, realct_case
from test_ingest_transfer_syntaxes import SYNTAXES

from service import dicom_series
from service.dicom_rtstruct import build_liver_rtstruct
from service.dicom_seg import build_liver_seg

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The pydicom-data files that are CT (or Enhanced CT), with the storescu option proposing their own encoding.
THIRD_PARTY_CT = {
    "693_J2KR.dcm": "-xv",  # JPEG 2000 lossless
    "693_UNCI.dcm": "-xe",  # explicit VR little endian
    "693_UNCR.dcm": "-xe",  # same SOP Instance UID as 693_J2KR.dcm, other bytes: kept in quarantine
    "bad_sequence.dcm": "-xs",  # JPEG Lossless, hex digests for UIDs, a sequence whose items are broken
    "eCT_Supplemental.dcm": "-xe",  # Enhanced CT, 2 frames: stored, not scored
}
# Too broken for storescu itself (VR UN elements, odd-length Pixel Data): storescu says so and sends nothing.
UNSENDABLE = ("explicit_VR-UN.dcm",)
ALGORITHM = {"algorithm_name": "CT Gatekeeper liver U-Net", "algorithm_version": "conformance"}


@dataclass
class Corpus:
    """What the module's one run of the listener produced."""

    storage_dir: Path
    db: Db
    # file name → storescu's output for it (as published)
    published: dict[str, str] = field(default_factory=dict)
    # (source, transfer syntax) → SeriesInstanceUID of the re-encoded series sent
    encoded: dict[tuple[str, str], str] = field(default_factory=dict)
    # storescu's output per transfer syntax
    sent: dict[str, str] = field(default_factory=dict)
    records: list[logging.LogRecord] = field(default_factory=list)

    def stored_series(self, series_instance_uid: str) -> dicom_series.SeriesFiles:
        [row] = self.db.series(series_instance_uid)
        paths = [self.storage_dir / i.relative_path for i in self.db.instances(row.id)]
        [group] = dicom_series.group_files(paths)
        return group


class _Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(level=logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def plain_copy(source: pydicom.Dataset, series_instance_uid: str) -> pydicom.Dataset:
    """`source` decompressed to explicit VR little endian, in a new series with a new SOP Instance UID."""
    dataset = pydicom.Dataset(source)
    dataset.file_meta = pydicom.dataset.FileMetaDataset(source.file_meta)
    if dataset.file_meta.TransferSyntaxUID.is_compressed:
        dataset.decompress()
    dataset.SeriesInstanceUID = series_instance_uid
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return dataset


def encode(plain: Path, transfer_syntax: str, out: Path) -> Path:
    """`plain` (explicit VR little endian) encoded in `transfer_syntax`, as the transfer-syntax test does."""
    how, _ = SYNTAXES[transfer_syntax]
    if how is None:
        return plain
    if how == "pydicom":
        dataset = pydicom.dcmread(plain)
        if transfer_syntax == JPEG2000:
            dataset.compress(transfer_syntax, j2k_cr=[10])
        else:
            dataset.compress(transfer_syntax)
        dataset.save_as(out)
        return out
    subprocess.run([*how, str(plain), str(out)], check=True, capture_output=True, timeout=120)
    return out


def sources() -> dict[str, list[Path]]:
    """The real images re-encoded in every syntax: name → files (one series per syntax)."""
    chosen = {"693_UNCR": [pydicom_data_dir() / "693_UNCR.dcm"]}
    for case in REALCT_CASES:
        chosen[case] = sorted((realct_case(case) / "ct").glob("*.dcm"))
    return chosen


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    tmp = tmp_path_factory.mktemp("conformance")
    url = f"sqlite:///{tmp / 'gatekeeper.db'}"
    upgrade(url)
    settings = make_settings(tmp / "var", url, "memory://")
    result = Corpus(storage_dir=settings.storage_dir, db=Db(url))
    handler = _Collect(result.records)
    logging.getLogger().addHandler(handler)
    try:
        # Encode before the listener starts: the listener's threads then only receive.
        batches: dict[str, list[Path]] = {ts: [] for ts in SYNTAXES}
        for name, paths in sources().items():
            for n, transfer_syntax in enumerate(SYNTAXES):
                series_uid = generate_uid()
                folder = tmp / "encoded" / name / str(n)
                folder.mkdir(parents=True)
                for k, path in enumerate(paths):
                    plain = plain_copy(pydicom.dcmread(path), series_uid)
                    plain.save_as(folder / f"{k:03d}.plain.dcm", enforce_file_format=True)
                    batches[transfer_syntax].append(
                        encode(folder / f"{k:03d}.plain.dcm", transfer_syntax, folder / f"{k:03d}.dcm")
                    )
                result.encoded[(name, transfer_syntax)] = series_uid
        with running_listener(settings, run_assembler=False) as listener:
            data = pydicom_data_dir()
            for name, option in THIRD_PARTY_CT.items():
                sent = storescu(listener.port, [data / name], option)
                result.published[name] = sent.stdout + sent.stderr
            for name in UNSENDABLE:
                sent = storescu(listener.port, [data / name], "-xv")
                result.published[name] = sent.stdout + sent.stderr
            for case, option in zip(REALCT_CASES, ("-xv", "-xe"), strict=True):
                sent = storescu(listener.port, sorted((realct_case(case) / "ct").glob("*.dcm")), option, "--no-halt")
                result.published[case] = sent.stdout + sent.stderr
            for transfer_syntax, paths in batches.items():
                sent = storescu(listener.port, paths, SYNTAXES[transfer_syntax][1], "--no-halt")
                result.sent[transfer_syntax] = sent.stdout + sent.stderr
        yield result
    finally:
        logging.getLogger().removeHandler(handler)
        result.db.close()


def plain_hu(name: str, tmp: Path) -> np.ndarray:
    """HU of a source subset read from its explicit VR little endian copy."""
    series_uid = generate_uid()
    for k, path in enumerate(sources()[name]):
        plain_copy(pydicom.dcmread(path), series_uid).save_as(tmp / f"{k:03d}.dcm", enforce_file_format=True)
    [group] = dicom_series.ct_series_in(dicom_series.scan_tree_strict(tmp))
    return dicom_series.load_series(group).hu


# --- 1. as published ----------------------------------------------------------------------------------


def test_each_published_file_is_stored_or_refused_with_a_named_reason(corpus: Corpus) -> None:
    for name in ("693_J2KR.dcm", "693_UNCI.dcm", "693_UNCR.dcm", "eCT_Supplemental.dcm", *REALCT_CASES):
        output = corpus.published[name]
        assert "Received Store Response (Success)" in output and "Error" not in output, f"{name}: {output}"
    for case in REALCT_CASES:
        assert corpus.published[case].count("Received Store Response (Success)") == len(
            list((realct_case(case) / "ct").glob("*.dcm"))
        )
    # Its UIDs are 64 hex digits, not DICOM UIDs (and a sequence is broken): refused with 0xA900, the
    # Error Comment and the log line name the attribute.
    assert "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in corpus.published["bad_sequence.dcm"]
    refusals = [r.getMessage() for r in corpus.records if "refused instance" in r.getMessage()]
    assert any("SOPInstanceUID missing or not a valid UID" in line for line in refusals), refusals
    # storescu itself cannot read it: nothing reaches the listener.
    assert "Received Store Response" not in corpus.published["explicit_VR-UN.dcm"]


def test_each_stored_published_series_is_read_or_refused_with_a_named_problem(corpus: Corpus) -> None:
    data = pydicom_data_dir()
    reasons = {}
    for name in ("693_UNCI.dcm", "eCT_Supplemental.dcm"):
        uid = str(pydicom.dcmread(data / name, stop_before_pixels=True).SeriesInstanceUID)
        with pytest.raises(dicom_series.SeriesError) as refused:
            dicom_series.load_series(corpus.stored_series(uid))
        reasons[name] = refused.value.problem
    # 693_J2KR/UNCR (one SOP Instance UID, the second copy quarantined) and 693_UNCI: one image plane, twice.
    assert "same position" in reasons["693_UNCI.dcm"] or "1 slice" in reasons["693_UNCI.dcm"], reasons
    assert "Enhanced CT (multi-frame) is not supported" in reasons["eCT_Supplemental.dcm"]
    for case in REALCT_CASES:
        uid = str(
            pydicom.dcmread(next((realct_case(case) / "ct").glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID
        )
        series = dicom_series.load_series(corpus.stored_series(uid))
        assert series.num_slices == len(list((realct_case(case) / "ct").glob("*.dcm")))


# --- 2. every accepted transfer syntax ------------------------------------------------------------------


def test_every_accepted_transfer_syntax_is_received_from_storescu(corpus: Corpus) -> None:
    files = sum(len(paths) for paths in sources().values())
    for transfer_syntax, output in corpus.sent.items():
        assert output.count("Received Store Response (Success)") == files, f"{transfer_syntax.name}: {output}"
    for (name, transfer_syntax), uid in corpus.encoded.items():
        [row] = corpus.db.series(uid)
        assert {i.transfer_syntax_uid for i in corpus.db.instances(row.id)} == {transfer_syntax}, name


@pytest.mark.parametrize("case", REALCT_CASES)
def test_each_transfer_syntax_reads_back_the_hu_of_the_source(corpus: Corpus, case: str, tmp_path: Path) -> None:
    expected = plain_hu(case, tmp_path)
    for transfer_syntax in SYNTAXES:
        uid = corpus.encoded[(case, transfer_syntax)]
        series = dicom_series.load_series(corpus.stored_series(uid))
        difference = np.abs(series.hu - expected)
        if transfer_syntax == JPEG2000:  # lossy: close, not equal
            assert float(difference.mean()) < 25, transfer_syntax.name
        else:
            assert float(difference.max()) == 0, transfer_syntax.name


def test_a_one_slice_series_in_any_syntax_is_refused_by_name(corpus: Corpus) -> None:
    for transfer_syntax in SYNTAXES:
        uid = corpus.encoded[("693_UNCR", transfer_syntax)]
        with pytest.raises(dicom_series.SeriesError, match="has 1 slice; expected at least 2"):
            dicom_series.load_series(corpus.stored_series(uid))


# --- 3. segmented, valid derived objects ----------------------------------------------------------------


def test_each_received_real_series_is_segmented_into_a_valid_seg_and_rtstruct(corpus: Corpus, tmp_path: Path) -> None:
    from service.segmentation import DEFAULT_MODEL_DIR, Segmenter

    segmenter = Segmenter(DEFAULT_MODEL_DIR)
    uids = {
        case: str(
            pydicom.dcmread(next((realct_case(case) / "ct").glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID
        )
        for case in REALCT_CASES
    }
    # The published series, and their JPEG 2000 lossless and lossy re-encodings (a sample: the HU test
    # above shows the other syntaxes give the very same volume).
    for (name, transfer_syntax), uid in corpus.encoded.items():
        if name in REALCT_CASES and transfer_syntax in (JPEG2000Lossless, JPEG2000):
            uids[f"{name}-{transfer_syntax}"] = uid
    checked = 0
    for label, uid in uids.items():
        group = corpus.stored_series(uid)
        series = dicom_series.load_series(group)
        mask = segmenter.segment(series).mask
        assert mask.any(), f"{label}: no liver found on a real abdominal series"
        by_uid = {i.sop_instance_uid: i.path for i in group.instances}
        headers = [pydicom.dcmread(by_uid[u], stop_before_pixels=True) for u in series.sop_instance_uids]
        seg = build_liver_seg(source_images=headers, mask=mask, source_series_version=1, **ALGORITHM)
        rtstruct = build_liver_rtstruct(source_images=headers, mask=mask, source_series_version=1, **ALGORITHM)
        for kind, derived in (("seg", seg), ("rtstruct", rtstruct)):
            path = tmp_path / f"{label.replace('.', '_')}-{kind}.dcm"
            derived.save_as(path, enforce_file_format=True)
            assert dciodvfy_errors(path) == [], f"{label} {kind}"
            checked += 1
    assert checked == 2 * len(uids)


def test_no_traceback_anywhere(corpus: Corpus) -> None:
    with_exception = [r for r in corpus.records if r.exc_info]
    assert with_exception == [], [r.getMessage() for r in with_exception]
    errors = [r.getMessage() for r in corpus.records if r.levelno >= logging.ERROR and r.name.startswith("service")]
    assert errors == []
