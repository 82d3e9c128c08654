"""What a received data set must satisfy before we acknowledge it, and the status when it does not.

Tolerant on input: a data set is refused only when it cannot be decoded, lacks what storage and the
pipeline depend on (the UIDs, and for images their pixel data), or its pixel data cannot be the size
its own header says. Small deviations (odd value lengths, non-standard strings) pass and are kept
exactly as received.
"""

from __future__ import annotations

import re
import warnings
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

# SOP classes the listener accepts (everything else is refused at association negotiation).
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
ACCEPTED_SOP_CLASSES = (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    SEGMENTATION_STORAGE,
    RT_STRUCTURE_SET_STORAGE,
)
# SOP classes whose series go to the pipeline; the others are stored and indexed only.
IMAGE_SOP_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)
# SOP classes that must carry Pixel Data.
PIXEL_SOP_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, SEGMENTATION_STORAGE)

# C-STORE statuses (PS3.4 Annex B.2.3), and the ones pynetdicom itself uses.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Failure: Out of Resources — the sender should retry later
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Failure: the IOD is violated (missing/mismatched data)
CANNOT_UNDERSTAND = 0xC000  # Failure: Cannot Understand (general)
CANNOT_DECODE = 0xC210  # Failure: Cannot Understand — the data set could not be decoded (pynetdicom)

#: The UIDs every stored instance must carry (keyword → tag); a data set without one is refused with 0xA900.
IDENTIFYING_UIDS = {
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
}

UNDEFINED_LENGTH = 0xFFFFFFFF
# The attributes `check_instance` reads after decoding.
_KEYWORDS_READ = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "PatientName",
    "PatientID",
    "StudyDate",
    "SeriesDescription",
    "Rows",
    "Columns",
    "BitsAllocated",
    "SamplesPerPixel",
    "NumberOfFrames",
)
_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class RefusedInstance(Exception):
    """The data set is not acknowledged; `status` is the C-STORE failure status to answer.

    `offending` holds the tags of the attributes at fault, for the response's Offending Element
    (0000,0901), e.g. (0x0020000E,) when the Series Instance UID is missing.
    """

    def __init__(self, status: int, comment: str, offending: tuple[int, ...] = ()) -> None:
        super().__init__(comment)
        self.status = status
        # DICOM Error Comment is LO: at most 64 characters.
        self.comment = comment[:64]
        self.offending = offending


@dataclass(frozen=True)
class CheckedInstance:
    """The attributes of an accepted data set that storage and assembly need.

    Patient fields are for display only and must never be logged.
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    modality: str
    patient_name: str | None
    patient_id: str | None
    study_date: str | None
    series_description: str | None


def is_valid_uid(value: str) -> bool:
    """True if `value` is a DICOM UID: 1 to 64 characters, digits in dot-separated components."""
    return 0 < len(value) <= 64 and bool(_UID_PATTERN.match(value))


def check_instance(
    file_bytes: bytes,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    max_inflated_bytes: int,
) -> CheckedInstance:
    """Decode a received file (preamble, meta, data set) and check it can be stored and used.

    `sop_class_uid` and `sop_instance_uid` are the Affected SOP Class/Instance UIDs of the C-STORE
    request; the data set must carry the same. `transfer_syntax_uid` is that of the presentation
    context (the file meta information says the same). A Deflated data set is inflated at most to
    `max_inflated_bytes`.

    Raises:
        RefusedInstance: with 0xC210 when the bytes cannot be decoded (truncated, wrong lengths,
            garbage), 0xA900 when a required attribute is missing, not a valid UID or does not
            match the request, or the pixel data does not have the size the header implies;
            0xA700 when a Deflated data set inflates to more than `max_inflated_bytes`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's value-validation warnings: tolerant on input
            if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
                dataset = read_deflated(file_bytes, max_inflated_bytes=max_inflated_bytes)
            else:
                dataset = dcmread(BytesIO(file_bytes))
            _check_value_lengths(dataset)
            _decode_sequences(dataset)
            for keyword in _KEYWORDS_READ:  # converted here: a value that does not convert cannot be decoded
                dataset.get(keyword)
    except RefusedInstance:
        raise
    except Exception as exc:  # pydicom raises many types on bad bytes; each means "cannot decode"
        raise RefusedInstance(CANNOT_DECODE, f"cannot decode data set: {type(exc).__name__}") from exc

    uids = {}
    for keyword, tag in IDENTIFYING_UIDS.items():
        value = str(dataset.get(keyword, "") or "").strip().rstrip("\0")
        if not is_valid_uid(value):
            # Never stored half-identified: an instance without its UIDs cannot be placed in a series.
            raise RefusedInstance(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} missing or not a valid UID", (tag,))
        uids[keyword] = value
    if uids["SOPClassUID"] != sop_class_uid:
        raise RefusedInstance(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from the request", (0x00080016,))
    if uids["SOPInstanceUID"] != sop_instance_uid:
        raise RefusedInstance(
            DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "SOPInstanceUID differs from the request", (0x00080018,)
        )
    if sop_class_uid in PIXEL_SOP_CLASSES:
        check_pixel_data(dataset, encapsulated=UID(transfer_syntax_uid).is_encapsulated)

    frame_of_reference = str(dataset.get("FrameOfReferenceUID", "") or "").strip()
    return CheckedInstance(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        frame_of_reference_uid=frame_of_reference if is_valid_uid(frame_of_reference) else None,
        modality=str(dataset.get("Modality", "") or "")[:16],
        patient_name=_text(dataset, "PatientName"),
        patient_id=_text(dataset, "PatientID"),
        study_date=_text(dataset, "StudyDate"),
        series_description=_text(dataset, "SeriesDescription"),
    )


def read_deflated(file_bytes: bytes, *, max_inflated_bytes: int) -> Dataset:
    """Decode a DICOM file whose data set is Deflated Explicit VR Little Endian, inflating at most
    `max_inflated_bytes` (pydicom's own reader would inflate all of it first: a decompression bomb).

    Raises:
        RefusedInstance: 0xA700 when the data set inflates to more than `max_inflated_bytes`.
        zlib.error, EOFError, ValueError: the file or its deflate stream is broken or cut off.
    """
    stream = BytesIO(file_bytes)
    stream.seek(128)
    if stream.read(4) != b"DICM":
        raise ValueError("no DICM prefix")
    meta = read_dataset(stream, is_implicit_VR=False, is_little_endian=True, stop_when=_after_file_meta)
    inflated = inflate(stream.read(), max_inflated_bytes=max_inflated_bytes)
    dataset = read_dataset(BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
    dataset.file_meta = FileMetaDataset(meta)
    return dataset


def _after_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != 0x0002


def inflate(deflated: bytes, *, max_inflated_bytes: int) -> bytes:
    """The raw deflate stream `deflated` inflated, never to more than `max_inflated_bytes` in memory.

    Raises:
        RefusedInstance: 0xA700 (Refused: Out of Resources) when the stream inflates to more.
        zlib.error: the stream is not valid deflate data.
        EOFError: the stream ends before its last block.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = inflater.decompress(deflated, max_inflated_bytes + 1)
    if len(inflated) > max_inflated_bytes:
        raise RefusedInstance(OUT_OF_RESOURCES, f"data set inflates to more than {max_inflated_bytes} bytes")
    if not inflater.eof:
        raise EOFError("the deflate stream is cut off")
    return inflated


def _check_value_lengths(dataset: Dataset) -> None:
    """Raise EOFError if an element's value is shorter than its length says (a truncated stream).

    pydicom keeps what it finds and reads on; we must not acknowledge a cut-off instance.
    """
    for tag in list(dataset.keys()):
        raw = dataset.get_item(tag)
        if (
            isinstance(raw, RawDataElement)
            and raw.length != UNDEFINED_LENGTH
            and raw.value is not None
            and len(raw.value) < raw.length
        ):
            raise EOFError(f"element {tag} has {len(raw.value)} of {raw.length} bytes")


def _decode_sequences(dataset: Dataset) -> None:
    """Parse every sequence, recursively, so broken item nesting or lengths raise here.

    Other values stay raw: a malformed string or number is a tolerated deviation, not a refusal,
    and converting every value would cost more time per instance than anything else in the check.
    """
    for tag in list(dataset.keys()):
        raw = dataset.get_item(tag)
        vr = raw.VR if raw is not None else None
        if vr is None and isinstance(raw, RawDataElement):
            vr = dictionary_VR(tag) if dictionary_has_tag(tag) else None
        if vr != "SQ":
            continue
        for item in dataset[tag].value:
            _decode_sequences(item)


def check_pixel_data(dataset: Dataset, *, encapsulated: bool) -> None:
    """Check Pixel Data is present and has the size Rows × Columns × Samples × Frames × BitsAllocated.

    For an encapsulated (compressed) transfer syntax the fragments must parse and give at least
    one frame per Number of Frames; the compressed stream itself is not decoded here.

    Raises:
        RefusedInstance: 0xA900 naming what is missing or how big the data is against what was expected.
    """
    if "PixelData" not in dataset:
        raise RefusedInstance(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "PixelData missing")
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        bits_allocated = int(dataset.BitsAllocated)
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise RefusedInstance(
            DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "Rows/Columns/BitsAllocated missing or invalid"
        ) from exc
    if min(rows, columns, bits_allocated, samples, frames) < 1:
        raise RefusedInstance(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "Rows/Columns/BitsAllocated/frames not positive")
    pixel_data = dataset.PixelData
    if not pixel_data:  # present with an empty value (pydicom reads it as None)
        raise RefusedInstance(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "PixelData empty")
    if encapsulated:
        try:
            found = sum(1 for _ in generate_fragmented_frames(pixel_data, number_of_frames=frames))
        except Exception as exc:  # malformed item tags or lengths inside the encapsulation
            raise RefusedInstance(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "encapsulated PixelData malformed") from exc
        if found < frames:
            raise RefusedInstance(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"PixelData has {found} frames; expected {frames}")
        return
    expected = (rows * columns * samples * frames * bits_allocated + 7) // 8
    if len(pixel_data) not in (expected, expected + 1):  # +1: padding to an even length
        raise RefusedInstance(
            DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"PixelData has {len(pixel_data)} bytes; expected {expected}"
        )


def _text(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    if value is None or value == "":
        return None
    return str(value)
