"""What a derived object (the liver SEG, the RT Structure Set) copies from its source CT: sanitised headers.

Tolerant on input, strict on output. Real CT headers carry small deviations that a reader shrugs off
but that a writer must not copy into an object we send: a Specific Character Set (0008,0005) that is
present but empty or names a repertoire nobody knows, strings longer than their VR allows, person
names without a single component separator ("DOE JANE"), dates written "2022-12-08", Type 2
attributes of the Patient and General Study modules missing altogether. `sanitised_headers` returns
copies of the source headers (no pixel data) in which every such value is made valid, so that the
derived objects are valid by construction; the sources themselves are never changed.

What each repair does:

- Character set: the values are decoded with the source's own declaration (pydicom falls back to
  its default for an empty or unknown one) and the copy declares what they need: nothing (the
  default repertoire) when every value is ASCII, else ISO_IR 192 (UTF-8), which holds any text.
- A value longer than its VR allows (PS3.5 Table 6.2-1) is cut to the maximum; a DS or IS value is
  rewritten as the same number in at most 16 / 12 characters. Control characters in a one-line text
  value become spaces; a CS value is upper-cased, other characters than A–Z, 0–9, space and "_"
  become "_"; a Patient's Sex other than M, F or O is emptied.
- A person name without "^" is read as the family name alone (PS3.5 6.2.1.1: trailing separators
  may be omitted) and written with a trailing "^", which says so unambiguously; more than five
  components or three component groups are cut.
- A DA / TM value that is not a date / time is emptied when separators cannot mend it.
- A Type 2 attribute of the Patient or General Study module that is missing is added empty.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import format_number_as_ds

log = logging.getLogger(__name__)

#: Longest value of each text VR in characters (PS3.5 Table 6.2-1); PN per component group.
MAX_LENGTH = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DA": 8,
    "DS": 16,
    "DT": 26,
    "IS": 12,
    "LO": 64,
    "LT": 10240,
    "PN": 64,
    "SH": 16,
    "ST": 1024,
    "TM": 14,
    "UI": 64,
}
#: Type 2 attributes of the Patient and General Study modules: present (empty if unknown) in every
#: derived object, which copies them from its source.
TYPE_2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
#: Specific Character Set of a copy whose text is not all ASCII.
UTF8 = "ISO_IR 192"
# Pixel data and the like: never copied into a header.
_PIXEL_GROUP = 0x7FE0
_PERSON_NAME_COMPONENTS = 5
_PERSON_NAME_GROUPS = 3
# Text VRs of one line: control characters (a CR/LF pasted into a name) become spaces.
_SINGLE_LINE = frozenset({"AE", "AS", "CS", "DT", "LO", "SH"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# CS: upper-case letters, digits, space and underscore only (PS3.5 6.2).
_NOT_CS = re.compile(r"[^A-Z0-9 _]")
#: Enumerated values of Patient's Sex (0010,0040); anything else is emptied (it is Type 2).
PATIENT_SEX = frozenset({"M", "F", "O"})
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


def sanitised_headers(source_images: Sequence[Dataset]) -> list[Dataset]:
    """Copies of the source headers in which every value a derived object copies is valid for its VR.

    Args:
        source_images: CT instances as read by pydicom (with or without pixel data).

    Returns:
        One new Dataset per source, in the same order, without pixel data: same elements (file
        meta included, so the SOP Class UID can fall back to the file meta's), values repaired as
        the module docstring says. The sources are not changed.
    """
    return [sanitised_header(ds) for ds in source_images]


def sanitised_header(source: Dataset) -> Dataset:
    """One source header, sanitised (see `sanitised_headers`)."""
    repaired: set[str] = set()
    copy = _sanitised_dataset(source, repaired)
    meta = getattr(source, "file_meta", None)
    if meta is not None:
        copy.file_meta = meta
    if not str(copy.get("SOPClassUID", "") or "").strip() and meta is not None:
        media_class = str(meta.get("MediaStorageSOPClassUID", "") or "").strip()
        if media_class:
            copy.SOPClassUID = media_class
            repaired.add("SOPClassUID (from the file meta)")
    sex = str(copy.get("PatientSex", "") or "").strip()
    if sex and sex not in PATIENT_SEX:
        copy.PatientSex = ""
        repaired.add("PatientSex")
    for keyword in TYPE_2_PATIENT_STUDY:
        if keyword not in copy:
            setattr(copy, keyword, "")
            repaired.add(keyword)
    if not _all_ascii(copy):
        copy.SpecificCharacterSet = UTF8
    declared = source.get("SpecificCharacterSet")
    if declared is not None and _declared_terms(declared) != _declared_terms(copy.get("SpecificCharacterSet")):
        repaired.add("SpecificCharacterSet")
    if repaired:
        # Attribute names only: never the values (patient data).
        log.info("source %s: repaired %s for derived objects", source.get("SOPInstanceUID", "?"), sorted(repaired))
    return copy


def _sanitised_dataset(source: Dataset, repaired: set[str]) -> Dataset:
    """A copy of `source` (or of a sequence item) without pixel data and character set, values repaired."""
    copy = Dataset()
    for element in source:  # iterating decodes each value with the source's own character set
        if element.tag.group == _PIXEL_GROUP or element.tag == 0x00080005:
            continue
        if element.VR == "SQ":
            items = [_sanitised_dataset(item, repaired) for item in element.value or []]
            copy.add(DataElement(element.tag, "SQ", DicomSequence(items)))
        else:
            copy.add(_sanitised_element(element, repaired))
    return copy


def _declared_terms(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    terms = list(value) if isinstance(value, (list, MultiValue)) else [value]
    return tuple(str(t).strip() for t in terms if str(t).strip())


def _sanitised_element(element: DataElement, repaired: set[str]) -> DataElement:
    """`element`, or a new element with the same tag and VR whose value is valid for the VR."""
    vr = element.VR
    if element.value is None or element.value == "":
        return element
    fix = _FIXES.get(vr)
    if fix is None:
        return element
    values = list(element.value) if isinstance(element.value, (list, MultiValue)) else [element.value]
    fixed = [fix(v) for v in values]
    if [str(v) for v in fixed] == [str(v) for v in values]:
        return element
    repaired.add(element.keyword or str(element.tag))
    return DataElement(element.tag, vr, fixed if len(fixed) > 1 else fixed[0])


def _cut(vr: str) -> Callable[[object], str]:
    def fix(value: object) -> str:
        text = str(value)
        if vr in _SINGLE_LINE:
            text = _CONTROL.sub(" ", text)
        if vr == "CS":
            text = _NOT_CS.sub("_", text.upper())
        return text[: MAX_LENGTH[vr]] if len(text) > MAX_LENGTH[vr] else text

    return fix


def _fix_person_name(value: object) -> str:
    text = _CONTROL.sub(" ", str(value))
    groups = text.split("=")[:_PERSON_NAME_GROUPS]
    fixed = []
    for group in groups:
        components = group.split("^")[:_PERSON_NAME_COMPONENTS]
        name = "^".join(components)
        fixed.append(name[: MAX_LENGTH["PN"]])
    result = "=".join(fixed)
    if result.strip() and "^" not in result:
        result = result[: MAX_LENGTH["PN"] - 1].rstrip() + "^"
    return result


def _fix_date(value: object) -> str:
    text = str(value).strip()
    if _DATE.match(text):
        return text
    mended = re.sub(r"[-./ ]", "", text)
    return mended if _DATE.match(mended) else ""


def _fix_time(value: object) -> str:
    text = str(value).strip()
    if _TIME.match(text):
        return text
    mended = text.replace(":", "")
    if _TIME.match(mended):
        return mended
    cut = mended[: MAX_LENGTH["TM"]]
    return cut if _TIME.match(cut) else ""


def _fix_decimal(value: object) -> object:
    text = str(value).strip()
    if len(text) <= MAX_LENGTH["DS"]:
        return value
    try:
        return format_number_as_ds(float(text))
    except (TypeError, ValueError):
        return text[: MAX_LENGTH["DS"]]


def _fix_integer(value: object) -> object:
    text = str(value).strip()
    if len(text) <= MAX_LENGTH["IS"]:
        return value
    try:
        return str(int(float(text)))[: MAX_LENGTH["IS"]]
    except (TypeError, ValueError):
        return text[: MAX_LENGTH["IS"]]


_FIXES: dict[str, Callable[[object], object]] = {
    **{vr: _cut(vr) for vr in ("AE", "AS", "CS", "DT", "LO", "LT", "SH", "ST")},
    "PN": _fix_person_name,
    "DA": _fix_date,
    "TM": _fix_time,
    "DS": _fix_decimal,
    "IS": _fix_integer,
}


def _all_ascii(dataset: Dataset) -> bool:
    """Whether every text value of `dataset` (sequences included) is ASCII."""
    for element in dataset:
        if element.VR == "SQ":
            if not all(_all_ascii(item) for item in element.value or []):
                return False
        elif element.VR in ("AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT") and element.value:
            values = element.value if isinstance(element.value, (list, MultiValue)) else [element.value]
            if not all(str(v).isascii() for v in values):
                return False
    return True
