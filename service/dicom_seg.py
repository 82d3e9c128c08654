"""The DICOM-SEG we deliver: the segmenter's liver mask as a BINARY Segmentation (highdicom).

One object per (source series version, algorithm version): its SeriesInstanceUID and SOP Instance
UID are derived from the source SeriesInstanceUID, the series version and the algorithm version, so
making it again and sending it again replaces the same object in the PACS rather than adding a
second one. It references every source CT instance, shares their Frame of Reference, and says in
its SeriesDescription that nobody has reviewed it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from service.dicom_headers import sanitised_headers
from service.uids import derived_uid

log = logging.getLogger(__name__)

# Namespace of the SEG's deterministic UIDs (see `service.uids.derived_uid`).
UID_NAMESPACE = "ct-gatekeeper-seg"
# SeriesDescription (LO, at most 64 characters) of every SEG we make: automatic and not reviewed.
SERIES_DESCRIPTION = "AUTO LIVER SEG - UNREVIEWED"
# ContentLabel (CS, at most 16 characters, upper case) and ContentDescription (LO).
CONTENT_LABEL = "AUTO_LIVER"
CONTENT_DESCRIPTION = "Automatic liver segmentation, not reviewed by a person"
# SeriesNumber of the SEG series; high so that viewers list it after the image series.
SERIES_NUMBER = 9901
MANUFACTURER = "CT Gatekeeper"
DEVICE_SERIAL_NUMBER = "1"
LIVER_SEGMENT_NUMBER = 1
# Longest value of a LO (Long String) element, e.g. AlgorithmName and AlgorithmVersion (PS3.5 6.2).
MAX_LO_LENGTH = 64


def seg_uids(*, source_series_instance_uid: str, source_series_version: int, algorithm_version: str) -> tuple[str, str]:
    """The (SeriesInstanceUID, SOPInstanceUID) of the SEG of one source series version by one algorithm version.

    The same inputs always give the same pair; a new series version or a new algorithm version
    gives a new pair.
    """
    parts = (source_series_instance_uid, source_series_version, algorithm_version)
    return derived_uid(UID_NAMESPACE, "seg-series", *parts), derived_uid(UID_NAMESPACE, "seg-instance", *parts)


def build_liver_seg(
    *,
    source_images: Sequence[pydicom.Dataset],
    mask: np.ndarray,
    algorithm_name: str,
    algorithm_version: str,
    source_series_version: int,
    series_number: int = SERIES_NUMBER,
    manufacturer: str = MANUFACTURER,
    software_versions: str | None = None,
    device_serial_number: str = DEVICE_SERIAL_NUMBER,
) -> hd.seg.Segmentation:
    """The automatic liver segmentation of one CT series version, as a BINARY DICOM-SEG.

    Args:
        source_images: the CT instances of one series; headers are enough (pixel data may be absent).
        mask: bool [slice, row, column]; `mask[i]` is the liver on `source_images[i]`, whatever the
            order of the images in space.
        algorithm_name: AlgorithmName of the segment, e.g. "CT Gatekeeper liver U-Net".
        algorithm_version: AlgorithmVersion, the model's version hash; part of the SEG's UIDs.
        source_series_version: which reception of the series this is (`Series.version`, from 1); part
            of the SEG's UIDs, so a series sent again with new content gets a new SEG.
        series_number: SeriesNumber of the SEG series.
        manufacturer: Manufacturer of the SEG (the equipment that made it: us).
        software_versions: SoftwareVersions; None: `algorithm_version`.
        device_serial_number: DeviceSerialNumber (required by the Enhanced General Equipment module).

    Returns:
        The SEG: one segment "Liver" (SCT 10200004, category Anatomical Structure), segment algorithm
        type AUTOMATIC, referencing every source instance, in their Frame of Reference. Frames
        without liver are omitted; the references still name every source instance.

    What the SEG copies from the sources (patient, study, character set) is taken from sanitised
    copies of their headers (`service.dicom_headers`): an empty Specific Character Set, an over-long
    string or a name without "^" in a real CT's header does not make an invalid SEG.

    Raises:
        ValueError: no source images; they belong to more than one series or Frame of Reference, or
            their sizes differ; `mask` does not match them in dtype or shape; a name or version is
            empty or too long; `source_series_version` < 1. The message names the field.
    """
    source_images = sanitised_headers(source_images)
    _check_inputs(
        source_images=source_images,
        mask=mask,
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
        source_series_version=source_series_version,
    )
    series_instance_uid, sop_instance_uid = seg_uids(
        source_series_instance_uid=str(source_images[0].SeriesInstanceUID),
        source_series_version=source_series_version,
        algorithm_version=algorithm_version,
    )
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm_version,
    )
    liver = hd.seg.SegmentDescription(
        segment_number=LIVER_SEGMENT_NUMBER,
        segment_label="Liver",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Liver,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_id="Liver",
        tracking_uid=derived_uid(UID_NAMESPACE, "liver-tracking", str(source_images[0].SeriesInstanceUID)),
    )
    seg = hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[liver],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name,
        software_versions=software_versions or algorithm_version,
        device_serial_number=device_serial_number,
        series_description=SERIES_DESCRIPTION,
        content_label=CONTENT_LABEL,
        content_description=CONTENT_DESCRIPTION,
        omit_empty_frames=True,
    )
    log.info(
        "built liver SEG %s: %d of %d slices with liver",
        sop_instance_uid,
        int(mask.any(axis=(1, 2)).sum()),
        len(source_images),
    )
    return seg


def _check_inputs(
    *,
    source_images: Sequence[pydicom.Dataset],
    mask: np.ndarray,
    algorithm_name: str,
    algorithm_version: str,
    source_series_version: int,
) -> None:
    """Raise ValueError naming the first input that `build_liver_seg` cannot use."""
    if len(source_images) == 0:
        raise ValueError("source_images is empty; expected the CT instances of one series")
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "Rows", "Columns"):
        values = {str(ds.get(keyword, "")) for ds in source_images}
        if "" in values:
            missing = next(i for i, ds in enumerate(source_images) if not str(ds.get(keyword, "")))
            raise ValueError(f"source_images[{missing}] has no {keyword}")
        if len(values) > 1:
            raise ValueError(f"source_images have {len(values)} different {keyword} values; expected 1")
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        found = mask.dtype if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"mask has dtype {found}; expected bool")
    expected = (len(source_images), int(source_images[0].Rows), int(source_images[0].Columns))
    if mask.shape != expected:
        raise ValueError(f"mask has shape {mask.shape}; expected {expected} (slices, Rows, Columns of source_images)")
    for field, value in (("algorithm_name", algorithm_name), ("algorithm_version", algorithm_version)):
        if not value.strip() or len(value) > MAX_LO_LENGTH or "\\" in value:
            raise ValueError(f"{field} {value!r} must have 1 to {MAX_LO_LENGTH} characters and no backslash")
    if source_series_version < 1:
        raise ValueError(f"source_series_version is {source_series_version}; expected >= 1")
