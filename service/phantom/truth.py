"""Read a generated series back: CT volume in HU and its ground truth from the DICOM-SEGs.

This reads the clinical formats (CT Image files, DICOM-SEG), not any private side file, so the
same code path serves evaluation on phantom data and on a hospital's own contoured series.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom

from service.imaging import slice_order, to_hu


@dataclass(frozen=True)
class SeriesTruth:
    """One phantom series as arrays, slices ordered head → feet (InstanceNumber order)."""

    hu: np.ndarray  # [slice, row, column] float32 HU
    labels: np.ndarray  # [slice, row, column] uint8, `Label` values (0 = none)
    anomaly: np.ndarray | None  # [slice, row, column] bool, None for a normal series
    sop_instance_uids: tuple[str, ...]
    entry: dict[str, Any]  # the series' manifest entry


def load_manifest(run_folder: Path) -> dict[str, Any]:
    """The manifest.json of a phantom run.

    Raises:
        FileNotFoundError: `run_folder` holds no manifest.json.
    """
    manifest: dict[str, Any] = json.loads((Path(run_folder) / "manifest.json").read_text())
    return manifest


def load_series(run_folder: Path, entry: dict[str, Any]) -> SeriesTruth:
    """Load the CT slices and ground-truth SEGs of one manifest entry."""
    folder = Path(run_folder) / entry["folder"]
    datasets = [pydicom.dcmread(folder / name) for name in entry["files"]]
    order = slice_order([ds.ImagePositionPatient for ds in datasets], datasets[0].ImageOrientationPatient)
    datasets = [datasets[i] for i in order]
    hu = np.stack([to_hu(ds.pixel_array, float(ds.RescaleSlope), float(ds.RescaleIntercept)) for ds in datasets])
    uids = tuple(str(ds.SOPInstanceUID) for ds in datasets)
    organs = hd.seg.segread(folder / entry["organs_seg"])
    labels = organs.get_pixels_by_source_instance(
        source_sop_instance_uids=list(uids), combine_segments=True, assert_missing_frames_are_empty=True
    ).astype(np.uint8)
    anomaly = None
    if entry.get("anomaly"):
        seg = hd.seg.segread(folder / entry["anomaly"]["seg"])
        anomaly = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(uids), segment_numbers=[1], assert_missing_frames_are_empty=True
        )[..., 0].astype(bool)
    return SeriesTruth(hu=hu, labels=labels, anomaly=anomaly, sop_instance_uids=uids, entry=entry)
