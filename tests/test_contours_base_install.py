"""Returned RT Structure Sets are read without the `train` extra (torch, onnx, matplotlib).

The production services are installed without `train` (pyproject.toml). The reading path of the
contour stage (`service.contours`: `contour_references`, `ct_headers`, `rasterise`) runs here in a
fresh Python process whose import system refuses those three packages, on a structure set made by
our own builder (`service.dicom_rtstruct.build_liver_rtstruct`) from a phantom's ground-truth liver.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

from service.dicom_rtstruct import build_liver_rtstruct
from service.phantom.canvas import Label
from service.phantom.generate import SeriesSpec, generate_series

REPO = Path(__file__).resolve().parents[1]
#: Top-level packages of the `train` extra (pyproject.toml `[project.optional-dependencies]`).
TRAIN_EXTRA = ("torch", "onnx", "matplotlib")

# Runs in the child process: argv[1] is a JSON job {"rtstruct", "ct_files", "out", "refused"}.
READER = """
import importlib.abc, json, sys

job = json.loads(sys.argv[1])
refused = set(job["refused"])
attempts = []


class RefuseTrainExtra(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in refused:
            attempts.append(name)
            raise ImportError(f"{name} is not installed (base install: no 'train' extra)")
        return None


sys.meta_path.insert(0, RefuseTrainExtra())

import numpy as np
import pydicom

from service.contours import contour_references, ct_headers, rasterise

ds = pydicom.dcmread(job["rtstruct"])
refs = contour_references(ds)
headers = ct_headers(job["ct_files"])
name, mask = rasterise(ds, headers, ["Liver"])
np.savez(job["out"], mask=mask, sop_instance_uids=np.array([str(h.SOPInstanceUID) for h in headers]))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in refused)
print(json.dumps({"name": name, "series": list(refs.series_instance_uids), "attempts": attempts, "loaded": loaded}))
"""


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def test_a_returned_rtstruct_is_read_without_torch_onnx_or_matplotlib(tmp_path: Path) -> None:
    entry = generate_series(
        SeriesSpec(folder="s", patient_seed=3, series_seed=103, num_slices=16, matrix=96), tmp_path / "phantom"
    )
    folder = tmp_path / "phantom" / entry["folder"]
    ct_files = [folder / name for name in entry["files"]]
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in ct_files]
    uids = [str(h.SOPInstanceUID) for h in headers]
    liver = (
        hd.seg.segread(folder / entry["organs_seg"]).get_pixels_by_source_instance(
            source_sop_instance_uids=uids, combine_segments=True, assert_missing_frames_are_empty=True
        )
        == Label.LIVER
    )
    assert liver.sum() > 300, "the phantom series must show the liver"
    rtstruct = tmp_path / "returned.rtstruct.dcm"
    build_liver_rtstruct(
        source_images=headers,
        mask=liver,
        algorithm_name="CT Gatekeeper liver U-Net",
        algorithm_version="test",
        source_series_version=1,
    ).save_as(rtstruct, enforce_file_format=True)

    job = {
        "rtstruct": str(rtstruct),
        "ct_files": [str(p) for p in ct_files],
        "out": str(tmp_path / "read.npz"),
        "refused": list(TRAIN_EXTRA),
    }
    run = subprocess.run(
        [sys.executable, "-c", READER, json.dumps(job)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, f"reading failed without the train extra:\n{run.stderr[-3000:]}"
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["attempts"] == [], f"the reading path tried to import {report['attempts']}"
    assert report["loaded"] == []
    assert report["name"] == "Liver"
    assert report["series"] == [str(headers[0].SeriesInstanceUID)]

    with np.load(tmp_path / "read.npz") as read:
        by_uid = dict(zip([str(u) for u in read["sop_instance_uids"]], read["mask"], strict=True))
    mask = np.stack([by_uid[uid] for uid in uids])
    assert mask.any()
    assert np.array_equal(mask.any(axis=(1, 2)), liver.any(axis=(1, 2))), "liver on other slices than built"
    assert dice(mask, liver) >= 0.98
