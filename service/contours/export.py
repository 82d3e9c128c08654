"""`gatekeeper pool export DIR`: the training pool as CT series plus liver DICOM-SEGs, for the segmenter's trainer.

`gatekeeper pool export DIR` (`export_pool`) writes what `gatekeeper train segmenter --data DIR`
reads (models/segmenter/data.py: CT series plus a liver DICOM-SEG referencing them):

    DIR/pool.json                          every exported entry with its provenance (below)
    DIR/<NNNN>_pool<id>/ct/<NNNN>.dcm      the stored CT instances, byte for byte, in volume order
    DIR/<NNNN>_pool<id>/liver.seg.dcm      the mask as a DICOM-SEG: segment "Liver" (SCT 10200004),
                                           algorithm type MANUAL, referencing every CT instance

`pool.json`: `{"pool_export_version": 1, "exported_at": ISO time, "entries": [{"pool_entry_id",
"folder", "series_instance_uid", "series_version", "contour_sop_instance_uid", "structure_name",
"calling_ae_title", "contoured_by", "received_at", "num_slices", "liver_voxels", "mask_sha256",
"seg_sop_instance_uid"}]}`. It is deliberately not a phantom `manifest.json`, whose split rules
would leave out the (mostly anomalous) pool series: the trainer holds out a seeded 10 % instead.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.contours.pool import iso_time, load_pool_mask, pool_entries
from service.db.tables import Instance, Series, User, utc_now
from service.ingest.checks import CT_IMAGE_STORAGE
from service.settings import Settings
from service.uids import derived_uid

#: Version of the `pool.json` layout an export writes.
POOL_EXPORT_VERSION = 1
#: Namespace of the export SEGs' deterministic UIDs (`service.uids.derived_uid`).
UID_NAMESPACE = "ct-gatekeeper-pool"


def build_pool_seg(*, source_images: Sequence[Dataset], mask: np.ndarray, contour_sop_instance_uid: str) -> Dataset:
    """The manual liver contour of one pool entry as a BINARY DICOM-SEG for training.

    One segment "Liver" (SCT 10200004), algorithm type MANUAL, referencing every source CT
    instance in its Frame of Reference; UIDs derived from the contour's SOP Instance UID.

    Raises:
        ValueError: `mask` does not match `source_images` (highdicom's checks).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    liver = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Liver",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Liver,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    return hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=mask.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[liver],
        series_instance_uid=derived_uid(UID_NAMESPACE, "seg-series", contour_sop_instance_uid),
        series_number=9902,
        sop_instance_uid=derived_uid(UID_NAMESPACE, "seg-instance", contour_sop_instance_uid),
        instance_number=1,
        manufacturer="CT Gatekeeper",
        manufacturer_model_name="training pool export",
        software_versions="1",
        device_serial_number="1",
        series_description="LIVER MANUAL CONTOUR (POOL)",
        content_label="LIVER_POOL",
        content_description="Returned manual liver contour, from the training pool",
        omit_empty_frames=True,
    )


def export_pool(
    *, sessions: sessionmaker[Session], settings: Settings, out: Path, progress: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Write the training pool (one entry per CT series) to `out` in the layout of the module docstring.

    Returns the `pool.json` entries. `out` must not exist or be an empty folder.

    Raises:
        FileExistsError: `out` exists and is not an empty folder.
        ValueError: a mask file is missing or changed, or no longer matches its stored CT series.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder")
    with sessions() as session:
        entries = pool_entries(session=session)
        versions = {i: v for i, v in session.execute(select(Series.id, Series.version)).tuples()}
        users = {i: name for i, name in session.execute(select(User.id, User.name)).tuples()}
        files = {
            e.id: [
                settings.storage_dir / p
                for p in session.scalars(
                    select(Instance.relative_path).where(
                        Instance.series_id == e.series_id, Instance.sop_class_uid == CT_IMAGE_STORAGE
                    )
                )
            ]
            for e in entries
        }
    out.mkdir(parents=True, exist_ok=True)
    exported = []
    for n, entry in enumerate(entries):
        folder = f"{n:04d}_pool{entry.id}"
        pool_mask = load_pool_mask(settings=settings, entry=entry)
        paths_by_uid = {}
        for path in files[entry.id]:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            paths_by_uid[str(header.SOPInstanceUID)] = (path, header)
        missing = [uid for uid in pool_mask.sop_instance_uids if uid not in paths_by_uid]
        if missing:
            raise ValueError(f"pool entry {entry.id}: CT instance {missing[0]} of its mask is no longer stored")
        (out / folder / "ct").mkdir(parents=True)
        headers = []
        for i, uid in enumerate(pool_mask.sop_instance_uids):
            path, header = paths_by_uid[uid]
            shutil.copyfile(path, out / folder / "ct" / f"{i:04d}.dcm")
            headers.append(header)
        seg = build_pool_seg(
            source_images=headers, mask=pool_mask.liver, contour_sop_instance_uid=entry.contour_sop_instance_uid
        )
        seg.save_as(out / folder / "liver.seg.dcm", enforce_file_format=True)
        exported.append(
            {
                "pool_entry_id": entry.id,
                "folder": folder,
                "series_instance_uid": entry.series_instance_uid,
                "series_version": versions.get(entry.series_id),
                "contour_sop_instance_uid": entry.contour_sop_instance_uid,
                "structure_name": entry.structure_name,
                "calling_ae_title": entry.calling_ae_title,
                "contoured_by": users.get(entry.contoured_by) if entry.contoured_by is not None else None,
                "received_at": iso_time(entry.received_at),
                "num_slices": entry.num_slices,
                "liver_voxels": entry.liver_voxels,
                "mask_sha256": entry.mask_sha256,
                "seg_sop_instance_uid": str(seg.SOPInstanceUID),
            }
        )
        if progress is not None:
            progress(f"{n + 1}/{len(entries)} {folder}: {len(headers)} slices")
    document = {"pool_export_version": POOL_EXPORT_VERSION, "exported_at": utc_now().isoformat(), "entries": exported}
    (out / "pool.json").write_text(json.dumps(document, indent=1) + "\n")
    return exported
