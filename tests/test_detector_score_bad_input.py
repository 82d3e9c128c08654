"""`gatekeeper score` on bad series: one error entry per bad series, the good ones still scored, exit 1.

One test per way a series can be unusable (one slice, mixed sizes, not CT, unreadable pixels, NaN
after decoding), each scored beside a good series; the detector is untrained (the scores do not
matter here, only that good series get them and bad ones get a named error).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import MRImageStorage

pytest.importorskip("torch")  # to export the untrained detector

from detector_support import untrained_detector  # noqa: E402

from service.commands.main import main as gatekeeper  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_detector(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One normal 6-slice series (64²) with its SEG ground truth beside it."""
    out = tmp_path_factory.mktemp("phantom")
    assert (
        gatekeeper(
            [
                "phantom",
                "--out",
                str(out),
                "--series",
                "1",
                "--slices",
                "6",
                "--matrix",
                "64",
                "--seed",
                "21",
                "--quiet",
            ]
        )
        == 0
    )
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


def _copy(src: Path, dst: Path, keep: int | None = None) -> list[Path]:
    dst.mkdir()
    files = sorted(src.glob("CT*.dcm"))[:keep]
    for f in files:
        shutil.copy(f, dst / f.name)
    return sorted(dst.glob("CT*.dcm"))


def one_slice(src: Path, dst: Path) -> None:
    _copy(src, dst, keep=1)


def mixed_sizes(src: Path, dst: Path) -> None:
    victim = _copy(src, dst)[3]
    ds = pydicom.dcmread(victim)
    ds.Rows, ds.Columns = 32, 32
    ds.PixelData = np.zeros((32, 32), np.uint16).tobytes()
    ds.save_as(victim)


def not_ct(src: Path, dst: Path) -> None:
    for f in _copy(src, dst):
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.SOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.save_as(f)


def unreadable_pixels(src: Path, dst: Path) -> None:
    victim = _copy(src, dst)[2]
    ds = pydicom.dcmread(victim)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # truncated
    ds.save_as(victim)


def nan_after_decoding(src: Path, dst: Path) -> None:
    victim = _copy(src, dst)[2]
    ds = pydicom.dcmread(victim)
    pixels = ds.pixel_array.astype(np.float32)
    pixels[10, 10] = np.nan
    del ds.PixelData, ds.PixelRepresentation
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.FloatPixelData = pixels.tobytes()  # decodes fine, to a NaN
    ds.save_as(victim)


@pytest.mark.parametrize(
    ("make_bad", "message"),
    [
        (one_slice, "has 1 slice"),
        (mixed_sizes, "2 different sizes"),
        (not_ct, "not a CT image series (Modality MR"),
        (unreadable_pixels, "unreadable pixels in CT000003.dcm"),
        (nan_after_decoding, "NaN or infinite HU after decoding in CT000003.dcm"),
    ],
    ids=["one_slice", "mixed_sizes", "not_ct", "unreadable_pixels", "nan_after_decoding"],
)
def test_bad_series_gets_an_error_entry_and_the_good_one_is_still_scored(
    make_bad: Callable[[Path, Path], None],
    message: str,
    model: Path,
    good: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = tmp_path / "bad"
    make_bad(good, bad)
    capsys.readouterr()
    rc = gatekeeper(["score", str(bad), str(good), "--model", str(model), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 1
    by_folder = {r["folder"]: r for r in doc["series"]}
    assert message in by_folder[str(bad)]["error"]
    ok = by_folder[str(good)]
    assert ok["error"] is None and len(ok["slices"]) == 6 and np.isfinite(ok["score"])

    rc = gatekeeper(["score", str(bad), "--model", str(model)])  # the table says it too, one line
    out = capsys.readouterr().out
    assert rc == 1 and out.startswith("ERROR") and message in out and len(out.strip().splitlines()) == 1


def test_only_good_series_exit_zero(model: Path, good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gatekeeper(["score", str(good), "--model", str(model)]) == 0
    assert capsys.readouterr().out.startswith(("ok", "FLAGGED"))
