"""DICOM encoding of a synthetic series: CT Image Storage files and ground-truth DICOM-SEGs.

Every CT file is a complete, valid CT Image IOD (checked with dicom3tools' `dciodvfy` in the
tests): consistent Study/Series/Frame of Reference UIDs, ImagePositionPatient and
ImageOrientationPatient for a head-first-supine axial scan, 12-bit stored values with
RescaleIntercept −1024, and fake demographics. UIDs are derived from the series seed, so the same
command writes the same UIDs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

from service.phantom.canvas import Label
from service.phantom.scanner import RESCALE_INTERCEPT, ScanGeometry
from service.uids import derived_uid

MANUFACTURER = "CT Gatekeeper"
MODEL_NAME = "Synthetic abdomen phantom"
SOFTWARE_VERSION = "phantom-1"
#: Head-first supine axial: rows run to the patient's left, columns to the back.
IMAGE_ORIENTATION = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


#: Namespace of the phantom's deterministic UIDs (see `service.uids.derived_uid`).
UID_NAMESPACE = "ct-gatekeeper-phantom"


class SeriesIdentity:
    """UIDs and fake demographics of one synthetic series (no real person's data)."""

    def __init__(self, *, patient_seed: int, series_seed: int, series_number: int = 1) -> None:
        rng = np.random.default_rng([patient_seed, 0xD1C0])
        self.patient_name = f"PHANTOM^{patient_seed:06d}"
        self.patient_id = f"PH{patient_seed:06d}"
        self.patient_sex = str(rng.choice(["F", "M"]))
        birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 70)))
        self.patient_birth_date = birth.strftime("%Y%m%d")
        study_day = dt.date(2024, 1, 1) + dt.timedelta(
            days=int(np.random.default_rng([series_seed, 7]).integers(0, 700))
        )
        self.study_date = study_day.strftime("%Y%m%d")
        self.study_time = f"{8 + series_seed % 10:02d}{series_seed % 60:02d}00"
        self.accession_number = f"A{series_seed:08d}"[:16]
        self.study_instance_uid = derived_uid(UID_NAMESPACE, "study", patient_seed, series_seed)
        self.series_instance_uid = derived_uid(UID_NAMESPACE, "series", patient_seed, series_seed)
        self.frame_of_reference_uid = derived_uid(UID_NAMESPACE, "for", patient_seed, series_seed)
        self.series_number = series_number
        self.series_seed = series_seed

    def sop_instance_uid(self, index: int) -> str:
        return derived_uid(UID_NAMESPACE, "ct", self.series_instance_uid, index)


def ct_datasets(
    identity: SeriesIdentity,
    geometry: ScanGeometry,
    *,
    series_description: str,
    kvp: float = 120.0,
) -> list[Dataset]:
    """One CT Image dataset per slice, without PixelData (added by `write_ct_slice`), head first."""
    now = dt.datetime(2025, 1, 1, 12, 0, 0)
    base = Dataset()
    base.SpecificCharacterSet = "ISO_IR 100"
    base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    base.SOPClassUID = CTImageStorage
    base.StudyDate = identity.study_date
    base.SeriesDate = identity.study_date
    base.AcquisitionDate = identity.study_date
    base.ContentDate = identity.study_date
    base.StudyTime = identity.study_time
    base.SeriesTime = identity.study_time
    base.AcquisitionTime = identity.study_time
    base.ContentTime = identity.study_time
    base.AccessionNumber = identity.accession_number
    base.Modality = "CT"
    base.Manufacturer = MANUFACTURER
    base.InstitutionName = "Synthetic"
    base.ReferringPhysicianName = ""
    base.StationName = "PHANTOM"
    base.StudyDescription = "CT ABDOMEN (synthetic)"
    base.SeriesDescription = series_description[:64]
    base.ManufacturerModelName = MODEL_NAME
    base.PatientName = identity.patient_name
    base.PatientID = identity.patient_id
    base.PatientBirthDate = identity.patient_birth_date
    base.PatientSex = identity.patient_sex
    base.BodyPartExamined = "ABDOMEN"
    base.SliceThickness = f"{geometry.slice_thickness:g}"
    base.KVP = f"{kvp:g}"
    base.SpacingBetweenSlices = f"{geometry.spacing_between_slices:g}"
    base.DataCollectionDiameter = "500"
    base.SoftwareVersions = SOFTWARE_VERSION
    base.ReconstructionDiameter = f"{2 * geometry.fov_radius:.1f}"
    base.GantryDetectorTilt = "0"
    base.TableHeight = "150"
    base.RotationDirection = "CW"
    base.XRayTubeCurrent = 200
    base.ConvolutionKernel = "STANDARD"
    base.PatientPosition = "HFS"
    base.StudyInstanceUID = identity.study_instance_uid
    base.SeriesInstanceUID = identity.series_instance_uid
    base.StudyID = "1"
    base.SeriesNumber = identity.series_number
    base.AcquisitionNumber = 1
    base.ImageOrientationPatient = IMAGE_ORIENTATION
    base.FrameOfReferenceUID = identity.frame_of_reference_uid
    base.PositionReferenceIndicator = ""
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows = geometry.rows
    base.Columns = geometry.columns
    base.PixelSpacing = [f"{geometry.pixel_spacing:.6g}", f"{geometry.pixel_spacing:.6g}"]
    base.BitsAllocated = 16
    base.BitsStored = 12
    base.HighBit = 11
    base.PixelRepresentation = 0
    base.WindowCenter = "40"
    base.WindowWidth = "400"
    base.RescaleIntercept = f"{RESCALE_INTERCEPT:g}"
    base.RescaleSlope = "1"
    base.RescaleType = "HU"
    base.InstanceCreationDate = now.strftime("%Y%m%d")
    base.InstanceCreationTime = now.strftime("%H%M%S")

    out = []
    x0, y0 = geometry.first_pixel_xy
    for index, z in enumerate(geometry.z_positions):
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = identity.sop_instance_uid(index)
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{z:.4f}"]
        ds.SliceLocation = f"{z:.4f}"
        out.append(ds)
    return out


def write_ct_slice(ds: Dataset, stored: np.ndarray, path: Path) -> None:
    """Write one CT slice as a DICOM Part 10 file (Explicit VR Little Endian)."""
    if stored.dtype != np.uint16 or stored.shape != (ds.Rows, ds.Columns):
        raise ValueError(f"stored pixels must be uint16 {ds.Rows}×{ds.Columns}, got {stored.dtype} {stored.shape}.")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.SmallestImagePixelValue = int(stored.min())
    ds.LargestImagePixelValue = int(stored.max())
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)
    del ds.PixelData  # keep the in-memory copy small; the SEG needs only the header


_ORGAN_CODES = {
    Label.LIVER: ("Liver", codes.SCT.Liver),
    Label.SPLEEN: ("Spleen", codes.SCT.Spleen),
    Label.KIDNEY_RIGHT: ("Right kidney", hd.sr.CodedConcept("9846003", "SCT", "Right kidney")),
    Label.KIDNEY_LEFT: ("Left kidney", hd.sr.CodedConcept("18639004", "SCT", "Left kidney")),
    Label.AORTA: ("Aorta", codes.SCT.Aorta),
    Label.IVC: ("Inferior vena cava", codes.SCT.InferiorVenaCava),
    Label.STOMACH: ("Stomach", codes.SCT.Stomach),
    Label.BOWEL: ("Bowel", hd.sr.CodedConcept("113276009", "SCT", "Intestinal structure")),
    Label.BONE: ("Bone", codes.SCT.Bone),
    Label.LUNG: ("Lung", codes.SCT.Lung),
    Label.URINARY_BLADDER: ("Urinary bladder", hd.sr.CodedConcept("89837001", "SCT", "Urinary bladder")),
    Label.GALLBLADDER: ("Gallbladder", codes.SCT.Gallbladder),
    Label.HEART: ("Heart", codes.SCT.Heart),
    Label.PANCREAS: ("Pancreas", codes.SCT.Pancreas),
}

_ANOMALY_CODES = {
    "stent": (codes.SCT.PhysicalObject, codes.SCT.Stent),
    "tumor": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
    "fluid": (codes.SCT.MorphologicallyAbnormalStructure, hd.sr.CodedConcept("389026000", "SCT", "Ascites")),
    "hip_prosthesis": (codes.SCT.PhysicalObject, codes.SCT.Prosthesis),
    "low_dose": (codes.SCT.MorphologicallyAbnormalStructure, hd.sr.CodedConcept("47973001", "SCT", "Artifact")),
    "contrast_phase": (codes.SCT.MorphologicallyAbnormalStructure, hd.sr.CodedConcept("47973001", "SCT", "Artifact")),
    "truncation": (codes.SCT.MorphologicallyAbnormalStructure, hd.sr.CodedConcept("47973001", "SCT", "Artifact")),
}

_ALGORITHM = hd.AlgorithmIdentificationSequence(
    name="CT Gatekeeper phantom ground truth",
    family=codes.cid7162.DeformableModels,
    version=SOFTWARE_VERSION,
)


def _segmentation(
    sources: Sequence[Dataset],
    pixel_array: np.ndarray,
    descriptions: list[hd.seg.SegmentDescription],
    *,
    identity: SeriesIdentity,
    kind: str,
    series_number: int,
    description: str,
) -> hd.seg.Segmentation:
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(UID_NAMESPACE, "seg-series", kind, identity.series_instance_uid),
        series_number=series_number,
        sop_instance_uid=derived_uid(UID_NAMESPACE, "seg", kind, identity.series_instance_uid),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=SOFTWARE_VERSION,
        device_serial_number="0",
        series_description=description,
        content_label=kind.upper()[:16],
        content_description=description[:64],
    )
    return seg


def organ_segmentation(sources: Sequence[Dataset], labels: np.ndarray, identity: SeriesIdentity) -> hd.seg.Segmentation:
    """The ground-truth organs as one BINARY DICOM-SEG; segment numbers are `Label` values.

    `labels` is [slice, row, column] uint8 in the same order as `sources`.
    """
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=int(label),
            segment_label=name,
            segmented_property_category=codes.SCT.Organ if label != Label.BONE else codes.SCT.Tissue,
            segmented_property_type=code,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_ALGORITHM,
        )
        for label, (name, code) in _ORGAN_CODES.items()
    ]
    return _segmentation(
        sources,
        labels,
        descriptions,
        identity=identity,
        kind="organs",
        series_number=identity.series_number + 100,
        description="Phantom ground truth: organs",
    )


def anomaly_segmentation(
    sources: Sequence[Dataset], mask: np.ndarray, identity: SeriesIdentity, anomaly: str
) -> hd.seg.Segmentation:
    """Where the injected anomaly is, as a one-segment BINARY DICOM-SEG ([slice, row, column] bool)."""
    category, code = _ANOMALY_CODES[anomaly]
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=anomaly,
        segmented_property_category=category,
        segmented_property_type=code,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_ALGORITHM,
    )
    return _segmentation(
        sources,
        mask.astype(np.uint8),
        [description],
        identity=identity,
        kind="anomaly",
        series_number=identity.series_number + 200,
        description=f"Phantom ground truth: {anomaly}",
    )
