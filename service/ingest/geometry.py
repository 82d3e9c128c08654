"""Series geometry checks from the headers: one orientation, even spacing, no gaps or duplicates.

The checks never raise on bad input: each problem is a `Finding` with a code and a message, and a
series with findings is still stored and queued (the pipeline routes it to manual review later).
The codes are stable for scripts: `no_slices`, `missing_geometry`, `localizer`, `too_few_slices`,
`multiple_orientations`, `duplicate_positions`, `missing_slices`, `inconsistent_spacing`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

# Orientation cosines closer than this count as the same orientation.
ORIENTATION_TOLERANCE = 1e-3
# Positions closer than this along the slice normal (mm) count as the same position.
DUPLICATE_TOLERANCE_MM = 0.01
# A gap this many times the typical spacing means slices are missing.
GAP_FACTOR = 1.5
# Spacings may differ from the typical one by this fraction (scanners round positions).
SPACING_TOLERANCE = 0.1
# Fewer slices than this is not a volume to segment.
MIN_SLICES = 3


@dataclass(frozen=True)
class SlicePlane:
    """Where one image (slice or frame) lies: ImagePositionPatient and ImageOrientationPatient."""

    sop_instance_uid: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    is_localizer: bool = False


@dataclass(frozen=True)
class Finding:
    """One geometry problem: a stable `code` and a message for people."""

    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def check_geometry(planes: Sequence[SlicePlane]) -> list[Finding]:
    """Check the slices of one series; an empty list means the geometry is consistent.

    Slices are ordered by their position along the normal of the (first) orientation, so the
    order of `planes` does not matter.
    """
    if not planes:
        return [Finding("no_slices", "Series has no image slices.")]
    findings: list[Finding] = []
    localizers = sum(plane.is_localizer for plane in planes)
    if localizers:
        findings.append(Finding("localizer", f"Series has {localizers} localizer image(s) (ImageType LOCALIZER)."))
    incomplete = [p for p in planes if p.position is None or p.orientation is None]
    if incomplete:
        findings.append(
            Finding(
                "missing_geometry",
                f"{len(incomplete)} of {len(planes)} slices lack ImagePositionPatient or ImageOrientationPatient.",
            )
        )
    usable = [p for p in planes if p.position is not None and p.orientation is not None]
    if len(usable) < MIN_SLICES:
        findings.append(
            Finding("too_few_slices", f"Series has {len(usable)} slices with geometry; expected >= {MIN_SLICES}.")
        )
        if len(usable) < 2:
            return findings

    orientations = np.array([p.orientation for p in usable], dtype=float)
    reference = orientations[0]
    differs = np.flatnonzero(np.abs(orientations - reference).max(axis=1) > ORIENTATION_TOLERANCE)
    if differs.size:
        distinct = _count_distinct(orientations)
        findings.append(
            Finding(
                "multiple_orientations",
                f"Series has {distinct} orientations; expected 1 (ImageOrientationPatient differs at slice "
                f"{int(differs[0]) + 1}).",
            )
        )
    normal = np.cross(reference[:3], reference[3:])
    if not np.linalg.norm(normal) > 0.5:
        findings.append(
            Finding("missing_geometry", "ImageOrientationPatient row and column are not orthogonal unit vectors.")
        )
        return findings
    positions = np.sort(np.array([p.position for p in usable], dtype=float) @ normal)
    steps = np.diff(positions)

    duplicates = int(np.count_nonzero(steps < DUPLICATE_TOLERANCE_MM))
    if duplicates:
        findings.append(Finding("duplicate_positions", f"{duplicates} slice position(s) occur more than once."))
    steps = steps[steps >= DUPLICATE_TOLERANCE_MM]
    if steps.size == 0:
        return findings
    typical = float(np.median(steps))
    gaps = steps[steps > GAP_FACTOR * typical]
    if gaps.size:
        missing = int(np.sum(np.round(gaps / typical) - 1))
        findings.append(
            Finding(
                "missing_slices",
                f"{gaps.size} gap(s) in slice positions, about {max(missing, 1)} slice(s) missing "
                f"(spacing {typical:.3g} mm, largest gap {gaps.max():.3g} mm).",
            )
        )
    regular = steps[steps <= GAP_FACTOR * typical]
    if regular.size and np.abs(regular - typical).max() > SPACING_TOLERANCE * typical:
        findings.append(
            Finding(
                "inconsistent_spacing",
                f"Slice spacing varies from {regular.min():.3g} to {regular.max():.3g} mm; expected {typical:.3g} mm ± "
                f"{SPACING_TOLERANCE:.0%}.",
            )
        )
    return findings


def _count_distinct(orientations: np.ndarray) -> int:
    distinct: list[np.ndarray] = []
    for row in orientations:
        if not any(np.abs(row - d).max() <= ORIENTATION_TOLERANCE for d in distinct):
            distinct.append(row)
    return len(distinct)


def planes_from_files(paths: Sequence[Path]) -> list[SlicePlane]:
    """Read the slice planes of CT and Enhanced CT files (headers only; frames of multi-frame files).

    A file that cannot be read gives a plane without geometry (reported as `missing_geometry`).
    """
    planes: list[SlicePlane] = []
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dataset = dcmread(path, stop_before_pixels=True)
                planes.extend(planes_from_dataset(dataset))
        except Exception:  # an unreadable header is a finding, never a crash
            log.warning("could not read the geometry of %s", path.name, exc_info=True)
            planes.append(SlicePlane(path.stem, None, None))
    return planes


def planes_from_dataset(dataset: Dataset) -> list[SlicePlane]:
    """The planes of one data set: one for a single-frame image, one per frame for Enhanced CT."""
    uid = str(dataset.get("SOPInstanceUID", ""))
    image_type = [str(v).upper() for v in (dataset.get("ImageType") or [])]
    is_localizer = "LOCALIZER" in image_type
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        return [
            SlicePlane(
                uid,
                _floats(dataset.get("ImagePositionPatient"), 3),
                _floats(dataset.get("ImageOrientationPatient"), 6),
                is_localizer,
            )
        ]
    shared = (dataset.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    planes = []
    for frame in per_frame:
        position = _nested(frame, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _nested(frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        if orientation is None:
            orientation = _nested(shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        frame_type = _nested(frame, "CTImageFrameTypeSequence", "FrameType") or []
        planes.append(
            SlicePlane(
                uid,
                _floats(position, 3),
                _floats(orientation, 6),
                is_localizer or "LOCALIZER" in [str(v).upper() for v in frame_type],
            )
        )
    return planes


def _nested(dataset: Dataset, sequence: str, keyword: str):  # type: ignore[no-untyped-def]
    items = dataset.get(sequence)
    if not items:
        return None
    return items[0].get(keyword)


def _floats(value: object, count: int):  # type: ignore[no-untyped-def]
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(np.isfinite(numbers)):
        return None
    return numbers
