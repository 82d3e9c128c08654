"""Read CT series from any folder tree of DICOM files, for training and for scoring.

A folder tree (a PACS export, a phantom run, one series folder) is scanned for DICOM files;
instances are grouped by SeriesInstanceUID whatever the file names, non-image objects
(DICOM-SEG, structured reports, presentation states …) are ignored, and each CT series is
sorted head → feet by the position of every slice along the image-plane normal
(`service.imaging.slice_order`). Pixels go to Hounsfield units through the Modality LUT.

Everything that makes a series unusable for scoring raises `SeriesError`, whose message names
the series and the problem: one slice, mixed sizes, not CT, unreadable pixels, NaN/inf after
decoding, several orientations, duplicate positions. No torch here (this runs in production).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage

from service import imaging

log = logging.getLogger(__name__)

#: Header attributes read while scanning a tree (pixels are read later, per series).
_SCAN_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "InstanceNumber",
]

#: The attributes that identify an instance, with their tags (for messages).
IDENTIFIER_TAGS = {
    "SOPClassUID": "(0008,0016)",
    "SOPInstanceUID": "(0008,0018)",
    "SeriesInstanceUID": "(0020,000E)",
}
#: Media Storage SOP Class of a DICOMDIR (not an instance of any series).
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

#: Image storage SOP classes we accept as CT (Enhanced CT is multi-frame: recognised, then refused).
_CT_SOP_CLASSES = {str(CTImageStorage)}


class SeriesError(ValueError):
    """A series cannot be used; the message names the series and what is wrong with it."""

    def __init__(self, series_instance_uid: str, problem: str) -> None:
        self.series_instance_uid = series_instance_uid
        self.problem = problem
        super().__init__(f"series {series_instance_uid}: {problem}")


@dataclass(frozen=True)
class Instance:
    """Header facts about one DICOM file found while scanning a tree."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    modality: str
    rows: int | None
    columns: int | None
    image_position: tuple[float, ...] | None
    image_orientation: tuple[float, ...] | None
    instance_number: int | None


@dataclass(frozen=True)
class UnidentifiedFile:
    """A DICOM file that cannot be placed in a series: it lacks an identifying UID.

    `missing` names the attribute and its tag, e.g. "SeriesInstanceUID (0020,000E)" (an anonymiser
    that strips UIDs leaves such files). An empty SOP Class UID in the data set is not missing
    when the file meta information names the class.
    """

    path: Path
    missing: str

    def __str__(self) -> str:
        return f"{self.path}: {self.missing} is missing or empty"


class UnidentifiedFilesError(ValueError):
    """Files under a folder lack an identifying UID; the message names the first file and the attribute."""

    def __init__(self, files: Sequence[UnidentifiedFile]) -> None:
        self.files = list(files)
        more = f" (and {len(files) - 1} more file{'s' if len(files) > 2 else ''})" if len(files) > 1 else ""
        super().__init__(f"{files[0]}{more}; cannot tell which instance or series it is")


@dataclass
class SeriesFiles:
    """The files of one series (by SeriesInstanceUID) found in a tree, not yet checked."""

    series_instance_uid: str
    instances: list[Instance] = field(default_factory=list)

    @property
    def modalities(self) -> set[str]:
        return {i.modality for i in self.instances}

    @property
    def is_ct(self) -> bool:
        """True when every instance is a CT Image Storage object with Modality CT."""
        return all(i.modality == "CT" and i.sop_class_uid in _CT_SOP_CLASSES for i in self.instances)

    @property
    def folder(self) -> Path:
        """The deepest folder holding every file of the series."""
        return Path(os.path.commonpath([str(i.path.parent) for i in self.instances]))


@dataclass(frozen=True)
class CTSeries:
    """One CT series in HU, slices ordered head → feet.

    Attributes:
        series_instance_uid: the DICOM SeriesInstanceUID.
        sop_instance_uids: SOPInstanceUID of each slice, in volume order.
        hu: float32 [slice, row, column] Hounsfield units.
        locations_mm: position of each slice along the slice normal (mm; decreasing head → feet).
        pixel_spacing_mm: (row spacing, column spacing) from PixelSpacing.
        folder: the folder holding the series' files.
    """

    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    hu: np.ndarray
    locations_mm: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    folder: Path

    @property
    def num_slices(self) -> int:
        return int(self.hu.shape[0])

    @property
    def slice_spacing_mm(self) -> float:
        """Median distance between neighbouring slices (mm)."""
        return float(np.median(np.abs(np.diff(self.locations_mm)))) if self.num_slices > 1 else 0.0

    def relative_positions(self) -> np.ndarray:
        """The naive position of each slice within the series: 0 (head-most) … 1 (foot-most)."""
        k = self.num_slices
        return np.linspace(0.0, 1.0, k, dtype=np.float32) if k > 1 else np.zeros(1, np.float32)


def _walk_files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _read_header(path: Path) -> Instance | None:
    """Header of one file, or None if it is not a DICOM file with a SeriesInstanceUID."""
    found = _read_file(path)
    return found if isinstance(found, Instance) else None


def _read_file(path: Path) -> Instance | UnidentifiedFile | None:
    """Header of one file; `UnidentifiedFile` for a DICOM object lacking an identifying UID; None if not DICOM."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_SCAN_TAGS)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError):
        return None  # not DICOM (a manifest, a README, a truncated file): not part of any series
    meta = getattr(ds, "file_meta", None)
    media_class = str(meta.get("MediaStorageSOPClassUID", "") or "").strip() if meta is not None else ""
    if media_class == MEDIA_STORAGE_DIRECTORY:
        return None  # a DICOMDIR: an index of files, not an instance
    # An empty SOP Class UID in the data set: the file meta names the class (tolerant on input).
    sop_class = str(ds.get("SOPClassUID", "") or "").strip() or media_class
    missing = _missing_identifier(ds, sop_class)
    if missing is not None:
        return UnidentifiedFile(path, missing)
    series_uid = str(ds.SeriesInstanceUID).strip()
    ipp = ds.get("ImagePositionPatient")
    iop = ds.get("ImageOrientationPatient")
    number = ds.get("InstanceNumber")
    try:
        return Instance(
            path=path,
            sop_class_uid=sop_class,
            sop_instance_uid=str(ds.get("SOPInstanceUID", "") or "").strip(),
            series_instance_uid=series_uid,
            modality=str(ds.get("Modality", "") or ""),
            rows=int(ds.Rows) if "Rows" in ds else None,
            columns=int(ds.Columns) if "Columns" in ds else None,
            image_position=tuple(float(v) for v in ipp) if ipp is not None else None,
            image_orientation=tuple(float(v) for v in iop) if iop is not None else None,
            instance_number=int(number) if number not in (None, "") else None,
        )
    except (TypeError, ValueError):
        # Present but malformed geometry: keep the file so the series reports it.
        return Instance(
            path,
            sop_class,
            str(ds.get("SOPInstanceUID", "")),
            series_uid,
            str(ds.get("Modality", "")),
            None,
            None,
            None,
            None,
            None,
        )


def _missing_identifier(ds: pydicom.Dataset, sop_class: str) -> str | None:
    """The first identifying attribute (with its tag) that `ds` lacks or leaves empty, or None."""
    values = {
        "SOPClassUID": sop_class,
        "SOPInstanceUID": str(ds.get("SOPInstanceUID", "") or "").strip(),
        "SeriesInstanceUID": str(ds.get("SeriesInstanceUID", "") or "").strip(),
    }
    for keyword, value in values.items():
        if not value:
            return f"{keyword} {IDENTIFIER_TAGS[keyword]}"
    return None


def scan_tree(root: Path | str) -> list[SeriesFiles]:
    """Every DICOM series under `root` (a folder tree or one file), in order of first file found.

    Non-DICOM files, and DICOM files without an identifying UID, are skipped silently (see
    `scan_tree_strict` for a scan that names the latter). The result includes non-CT series (e.g.
    the phantom's DICOM-SEG ground truth); use `SeriesFiles.is_ct` or `ct_series_in` to keep the CT ones.

    Raises:
        FileNotFoundError: `root` does not exist.
    """
    return _scan(root)[0]


def scan_tree_strict(root: Path | str) -> list[SeriesFiles]:
    """`scan_tree`, but a DICOM file lacking an identifying UID (SOP Class, SOP Instance or Series
    Instance UID) fails the scan instead of being left out of its series.

    For the commands that make something of a folder: a series with a file silently missing would
    be scored or segmented as if it were whole.

    Raises:
        UnidentifiedFilesError: such files were found; the message names the first file and the attribute.
        FileNotFoundError: `root` does not exist.
    """
    groups, unidentified = _scan(root)
    if unidentified:
        raise UnidentifiedFilesError(unidentified)
    return groups


def _scan(root: Path | str) -> tuple[list[SeriesFiles], list[UnidentifiedFile]]:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such file or folder: {root}")
    groups: dict[str, SeriesFiles] = {}
    unidentified: list[UnidentifiedFile] = []
    for path in _walk_files(root):
        found = _read_file(path)
        if isinstance(found, UnidentifiedFile):
            log.debug("%s", found)
            unidentified.append(found)
        elif found is not None:
            groups.setdefault(found.series_instance_uid, SeriesFiles(found.series_instance_uid)).instances.append(found)
    return list(groups.values()), unidentified


def group_files(paths: Iterable[Path | str]) -> list[SeriesFiles]:
    """The DICOM series among `paths` (files), grouped by SeriesInstanceUID in order of first file.

    For a series whose files are known one by one (the listener's storage); non-DICOM files are
    skipped silently, as in `scan_tree`.
    """
    groups: dict[str, SeriesFiles] = {}
    for path in paths:
        inst = _read_header(Path(path))
        if inst is not None:
            groups.setdefault(inst.series_instance_uid, SeriesFiles(inst.series_instance_uid)).instances.append(inst)
    return list(groups.values())


def ct_series_in(groups: Iterable[SeriesFiles]) -> list[SeriesFiles]:
    """Keep the series that hold CT images; log the ones ignored (SEG, SR, other modalities)."""
    kept = []
    for g in groups:
        if g.is_ct:
            kept.append(g)
        else:
            log.debug("ignoring series %s (modality %s)", g.series_instance_uid, ",".join(sorted(g.modalities)))
    return kept


def load_series(files: SeriesFiles) -> CTSeries:
    """Read, check and order one CT series; pixels in HU.

    Raises:
        SeriesError: the series is not CT; has one slice; has slices of different sizes; lacks or has
            inconsistent geometry (ImagePositionPatient/ImageOrientationPatient missing, several
            orientations, two slices at the same position); a slice's pixels cannot be decoded; or
            the HU values contain NaN or infinity.
    """
    uid = files.series_instance_uid
    instances = files.instances
    if not files.is_ct:
        found = ",".join(sorted(files.modalities)) or "none"
        sop = sorted({i.sop_class_uid for i in instances})
        if str(EnhancedCTImageStorage) in sop:
            raise SeriesError(uid, "Enhanced CT (multi-frame) is not supported; expected CT Image Storage")
        raise SeriesError(uid, f"not a CT image series (Modality {found}, SOP Class {', '.join(sop)})")
    if len(instances) < 2:
        raise SeriesError(uid, f"has {len(instances)} slice; expected at least 2 to order and score a series")
    sizes = {(i.rows, i.columns) for i in instances}
    if len(sizes) != 1:
        listed = ", ".join(f"{r}x{c}" for r, c in sorted(sizes, key=str))
        raise SeriesError(uid, f"has slices of {len(sizes)} different sizes ({listed}); expected one size")
    missing = [i.path.name for i in instances if i.image_position is None or i.image_orientation is None]
    if missing:
        raise SeriesError(uid, f"ImagePositionPatient/ImageOrientationPatient missing or malformed in {missing[0]}")
    iops = np.array([i.image_orientation for i in instances], dtype=np.float64)
    differs = np.flatnonzero(np.abs(iops - iops[0]).max(axis=1) > 1e-4)
    if differs.size:
        where = instances[differs[0]].path.name
        raise SeriesError(uid, f"has 2 or more orientations (ImageOrientationPatient differs at {where}); expected 1")
    positions = [i.image_position for i in instances if i.image_position is not None]  # all present (checked above)
    try:
        order = imaging.slice_order(positions, iops[0])
        locations = imaging.slice_distances(positions, iops[0])[order]
    except ValueError as exc:
        raise SeriesError(uid, str(exc)) from None
    gaps = np.abs(np.diff(locations))
    if np.any(gaps < 1e-3):
        j = int(np.flatnonzero(gaps < 1e-3)[0])
        raise SeriesError(
            uid,
            f"two slices at the same position ({instances[order[j]].path.name}, {instances[order[j + 1]].path.name})",
        )
    ordered = [instances[k] for k in order]

    rows, cols = ordered[0].rows or 0, ordered[0].columns or 0
    hu = np.empty((len(ordered), rows, cols), np.float32)
    spacing: tuple[float, float] | None = None
    for n, inst in enumerate(ordered):
        try:
            ds = pydicom.dcmread(inst.path)
            stored = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 — any decoder failure means "unreadable pixels" for this series
            raise SeriesError(uid, f"unreadable pixels in {inst.path.name} ({type(exc).__name__}: {exc})") from None
        if stored.shape != (rows, cols):
            raise SeriesError(uid, f"{inst.path.name} decodes to {stored.shape}, expected one {rows}x{cols} frame")
        try:
            slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
            with np.errstate(over="ignore", invalid="ignore"):  # reported below as NaN/inf HU
                hu[n] = imaging.to_hu(stored, slope, intercept)
        except (TypeError, ValueError) as exc:
            raise SeriesError(uid, f"bad Modality LUT in {inst.path.name}: {exc}") from None
        if spacing is None and "PixelSpacing" in ds:
            spacing = (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
    if not np.all(np.isfinite(hu)):
        bad = int(np.flatnonzero(~np.isfinite(hu).all(axis=(1, 2)))[0])
        raise SeriesError(uid, f"NaN or infinite HU after decoding in {ordered[bad].path.name}")
    return CTSeries(
        series_instance_uid=uid,
        sop_instance_uids=tuple(i.sop_instance_uid for i in ordered),
        hu=hu,
        locations_mm=np.asarray(locations, dtype=np.float64),
        pixel_spacing_mm=spacing or (1.0, 1.0),
        folder=files.folder,
    )


def read_ct_series(root: Path | str) -> list[CTSeries]:
    """Every CT series under `root`, loaded; the first bad one raises.

    Raises:
        SeriesError: see `load_series`; also when `root` holds no CT series at all.
        UnidentifiedFilesError: a DICOM file under `root` lacks an identifying UID (`scan_tree_strict`).
        FileNotFoundError: `root` does not exist.
    """
    groups = ct_series_in(scan_tree_strict(root))
    if not groups:
        raise SeriesError("(none)", f"no CT image series under {root}")
    return [load_series(g) for g in groups]
