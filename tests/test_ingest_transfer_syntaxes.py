"""Every accepted transfer syntax, sent by DCMTK storescu, is stored as received and its pixels read back;
real third-party files (pydicom-data) each get the right answer."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from ingest_support import Db, ct_files, make_phantom, make_settings, running_listener, storescu, upgrade
from pydicom import dcmread
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

pytestmark = pytest.mark.integration

# transfer syntax -> (how to make the file from Explicit VR Little Endian, storescu option to propose it)
SYNTAXES = {
    ExplicitVRLittleEndian: (None, "-xe"),
    ImplicitVRLittleEndian: (["dcmconv", "+ti"], "-xi"),
    DeflatedExplicitVRLittleEndian: (["dcmconv", "+td"], "-xd"),
    JPEGLosslessSV1: (["dcmcjpeg", "+e1"], "-xs"),
    JPEGLSLossless: (["dcmcjpls", "+el"], "-xt"),
    JPEG2000Lossless: ("pydicom", "-xv"),
    JPEG2000: ("pydicom", "-xw"),
    RLELossless: (["dcmcrle"], "-xr"),
}


@pytest.fixture
def db_url(postgres_db_url: str) -> str:
    upgrade(postgres_db_url)
    return postgres_db_url


@pytest.fixture
def db(db_url: str) -> Iterator[Db]:
    database = Db(db_url)
    yield database
    database.close()


def encode_as(source: Path, transfer_syntax: str, out: Path) -> Path:
    """A copy of `source` with a new SOP Instance UID, encoded in `transfer_syntax`."""
    dataset = dcmread(source)
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    plain = out.with_suffix(".plain.dcm")
    dataset.save_as(plain)
    how, _ = SYNTAXES[transfer_syntax]
    if how is None:
        return plain
    if how == "pydicom":
        if transfer_syntax == JPEG2000:
            dataset.compress(transfer_syntax, j2k_cr=[10])
        else:
            dataset.compress(transfer_syntax)
        dataset.save_as(out)
        return out
    subprocess.run([*how, str(plain), str(out)], check=True, capture_output=True)
    return out


def test_each_transfer_syntax_is_stored_as_received_and_pixels_read_back(
    tmp_path: Path, db_url: str, redis_url: str, db: Db
) -> None:
    [folder] = make_phantom(tmp_path / "phantom", slices=1, seed=5)
    source = ct_files(folder)[0]
    original = dcmread(source).pixel_array.astype(np.int32)
    settings = make_settings(tmp_path / "var", db_url, redis_url)
    sent = {ts: encode_as(source, ts, tmp_path / f"{i}.dcm") for i, ts in enumerate(SYNTAXES)}
    with running_listener(settings, run_assembler=False) as listener:
        for transfer_syntax, path in sent.items():
            result = storescu(listener.port, [path], SYNTAXES[transfer_syntax][1])
            assert result.returncode == 0 and "Success" in result.stdout + result.stderr, transfer_syntax.name
    [series] = db.series()
    stored = {i.transfer_syntax_uid: settings.storage_dir / i.relative_path for i in db.instances(series.id)}
    assert set(stored) == set(SYNTAXES)
    for transfer_syntax, path in stored.items():
        dataset = dcmread(path)
        assert dataset.file_meta.TransferSyntaxUID == transfer_syntax
        difference = np.abs(dataset.pixel_array.astype(np.int32) - original)
        if transfer_syntax == JPEG2000:  # lossy: close, not equal
            assert difference.mean() < 25, transfer_syntax.name
        else:
            assert difference.max() == 0, transfer_syntax.name
        if transfer_syntax != DeflatedExplicitVRLittleEndian:  # the data set bytes are those sent
            sent_dataset = dcmread(sent[transfer_syntax])
            assert dataset.PixelData == sent_dataset.PixelData, transfer_syntax.name


def third_party_dir() -> Path:
    import data_store

    return Path(data_store.__file__).parent / "data"


# pydicom-data files of the SOP classes we accept, and the answer each must get.
ACCEPTED_THIRD_PARTY = {
    "693_J2KR.dcm": "Success",  # CT, JPEG 2000 lossless
    "693_UNCI.dcm": "Success",  # CT, explicit little endian
    "693_UNCR.dcm": "Success",
    # CT, JPEG 2000 with elements of VR UN and an odd-length Pixel Data: storescu itself cannot read it.
    "explicit_VR-UN.dcm": "Unsendable",
    "eCT_Supplemental.dcm": "Success",  # Enhanced CT, 2 frames
    "liver.dcm": "Success",  # Segmentation
    "liver_expb.dcm": "Success",  # Segmentation, big endian: storescu converts it to little endian
    # CT, JPEG Lossless with a sequence whose items are broken: pydicom cannot decode it.
    "bad_sequence.dcm": "Refused",
}


def propose_options(path: Path) -> list[str]:
    """storescu options that propose the file's own transfer syntax (so it is sent as it is).

    `-R` (propose what the files need) is the only way storescu proposes SEG and RT Structure Set,
    but then it converts compressed files to an uncompressed syntax; so `-R` for those classes only.
    """
    header = dcmread(path, stop_before_pixels=True, force=True)
    if "TransferSyntaxUID" not in header.file_meta:
        return ["-xe"]
    options = (
        ["-R"] if header.get("SOPClassUID") in ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.481.3") else []
    )
    for syntax, (_, option) in SYNTAXES.items():
        if syntax == header.file_meta.TransferSyntaxUID:
            return [*options, option]
    return [*options, "-xe"]  # e.g. big endian: storescu converts it to explicit little endian


def test_third_party_files_each_get_the_right_status(tmp_path: Path, db_url: str, redis_url: str, db: Db) -> None:
    data = third_party_dir()
    settings = make_settings(tmp_path / "var", db_url, redis_url)
    everything = sorted(p for p in data.glob("*.dcm"))
    refused_at_negotiation = [p for p in everything if p.name not in ACCEPTED_THIRD_PARTY]
    with running_listener(settings, run_assembler=False) as listener:
        for name, expected in ACCEPTED_THIRD_PARTY.items():
            result = storescu(listener.port, [data / name], *propose_options(data / name))
            output = result.stdout + result.stderr
            if expected == "Success":
                assert "Received Store Response (Success)" in output, f"{name}: {output}"
            elif expected == "Unsendable":
                assert "Received Store Response" not in output and result.returncode != 0, f"{name}: {output}"
            else:
                assert "Received Store Response (Success)" not in output, f"{name}: {output}"
                assert "Received Store Response" in output, f"{name}: {output}"
        # Every other file (MR, US, CR, secondary capture, ...) is refused at negotiation; a few are
        # too broken for storescu itself to send (it says so and sends nothing).
        refused = 0
        for path in refused_at_negotiation:
            result = storescu(listener.port, [path], "+C", *propose_options(path)[-1:])
            output = result.stdout + result.stderr
            assert "Received Store Response" not in output, f"{path.name}: {output}"
            if "No presentation context for" in output:
                refused += 1
            else:
                assert "missing SOP class" in output or "Bad DICOM file" in output or "E: " in output, output
        assert refused >= len(refused_at_negotiation) - 3
    stored = {i.sop_instance_uid for s in db.series() for i in db.instances(s.id)}
    expected_uids = {
        str(dcmread(data / n, stop_before_pixels=True).SOPInstanceUID)
        for n, e in ACCEPTED_THIRD_PARTY.items()
        if e == "Success"
    }
    assert stored == expected_uids
