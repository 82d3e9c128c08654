"""Stage 1 — the site's series and the patient-wise split (train / validation / held-out).

The protocol (`ROLES`): every patient's series go to exactly one role, so that no patient is both
learnt from and judged on:

* `train` — the detector learns the site's normal anatomy from these;
* `detector_validation` — the detector's score terms are normalised on these (validation, part 1);
* `gate_calibration` — the gate's references, each signal's centre and scale (leave-one-series-out)
  and the thresholds are fitted on these (validation, part 2), never on series the detector's
  normalisation saw;
* `held_out` — the report's false-flag rate and Dice are measured on these only.

Patients are told apart by the DICOM Patient ID, hashed with the run's seed in memory only: no
Patient ID or name is logged or written — only counts and Series Instance UIDs. A series without a
Patient ID counts as its own patient.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from service import dicom_series

log = logging.getLogger(__name__)

#: Role → (share of the patients, minimum number of patients). `train` takes what the others leave.
ROLES: dict[str, tuple[float, int]] = {
    "train": (0.5, 6),
    "detector_validation": (0.1, 2),
    "gate_calibration": (0.2, 8),
    "held_out": (0.2, 8),
}
#: The fewest normal series (of as many patients) the protocol can split.
MINIMUM_NORMALS = sum(minimum for _, minimum in ROLES.values())
SPLIT_FILE = "split.json"


class TooFewNormals(ValueError):
    """Fewer normal series (or patients) than the protocol needs; the message names the minimum."""


def minimum_sentence() -> str:
    """The protocol's minimum in words, e.g. for the one-line refusal and the report."""
    parts = ", ".join(f"{role.replace('_', ' ')} {minimum}" for role, (_, minimum) in ROLES.items())
    return f"at least {MINIMUM_NORMALS} normal CT series of {MINIMUM_NORMALS} different patients ({parts})"


def _patient_key(files: dicom_series.SeriesFiles, seed: int) -> tuple[str, bool]:
    """(a salted hash of the series' Patient ID — never stored —, whether it has one); without one the
    hash is of the series UID (a patient of its own)."""
    patient_id = ""
    try:
        ds = pydicom.dcmread(files.instances[0].path, stop_before_pixels=True, specific_tags=["PatientID"])
        patient_id = str(getattr(ds, "PatientID", "") or "").strip()
    except (InvalidDicomError, OSError, EOFError, ValueError):
        pass
    value = f"patient:{patient_id}" if patient_id else f"series:{files.series_instance_uid}"
    return hashlib.sha256(f"{seed}:{value}".encode()).hexdigest(), bool(patient_id)


@dataclass
class Split:
    """The series of each role (Series Instance UIDs) and how many patients each role holds."""

    roles: dict[str, list[str]]
    patients: dict[str, int]
    seed: int
    series_without_patient_id: int
    contoured: list[str]
    abnormal: list[str]
    fingerprint: str

    def role_of(self, series_instance_uid: str) -> str | None:
        for role, uids in self.roles.items():
            if series_instance_uid in uids:
                return role
        return None

    def as_json(self) -> dict[str, Any]:
        return {
            "protocol": {role: {"share": share, "minimum_patients": m} for role, (share, m) in ROLES.items()},
            "minimum": minimum_sentence(),
            "seed": self.seed,
            "patients": self.patients,
            "series": {role: len(uids) for role, uids in self.roles.items()},
            "series_without_patient_id": self.series_without_patient_id,
            "roles": self.roles,
            "contoured": self.contoured,
            "abnormal": self.abnormal,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Split:
        return cls(
            roles={k: list(v) for k, v in doc["roles"].items()},
            patients=dict(doc["patients"]),
            seed=int(doc["seed"]),
            series_without_patient_id=int(doc["series_without_patient_id"]),
            contoured=list(doc["contoured"]),
            abnormal=list(doc["abnormal"]),
            fingerprint=str(doc["fingerprint"]),
        )


def fingerprint(normals: list[dicom_series.SeriesFiles], abnormal: list[dicom_series.SeriesFiles], seed: int) -> str:
    """SHA-256 over the seed and the sorted series and SOP Instance UIDs: the same data gives the same split."""
    h = hashlib.sha256(f"seed:{seed}".encode())
    for label, groups in (("normal", normals), ("abnormal", abnormal)):
        for g in sorted(groups, key=lambda g: g.series_instance_uid):
            h.update(f"{label}:{g.series_instance_uid}".encode())
            for uid in sorted(i.sop_instance_uid for i in g.instances):
                h.update(uid.encode())
    return h.hexdigest()


def role_sizes(num_patients: int) -> dict[str, int]:
    """Patients per role for `num_patients`: each role its share (at least its minimum), train the rest.

    Raises:
        TooFewNormals: `num_patients` is below the protocol's minimum.
    """
    if num_patients < MINIMUM_NORMALS:
        raise TooFewNormals(f"{num_patients} usable; the protocol needs {minimum_sentence()}")
    sizes = {role: max(m, int(math.floor(share * num_patients + 0.5))) for role, (share, m) in ROLES.items()}
    sizes["train"] = num_patients - sum(n for role, n in sizes.items() if role != "train")
    return sizes


def split_patients(
    normals: list[dicom_series.SeriesFiles],
    *,
    seed: int,
    contoured: set[str],
    abnormal: list[dicom_series.SeriesFiles],
) -> Split:
    """The patient-wise split of `normals` (see the module docstring).

    Patients are ordered by their salted hash, which is random but repeatable; a patient with a liver
    contour is placed first in the held-out role, so that Dice is measured where contours exist, then
    the other roles are filled in protocol order.

    Raises:
        TooFewNormals: fewer patients than the protocol needs.
    """
    by_patient: dict[str, list[str]] = {}
    without_id = 0
    for g in normals:
        key, has_id = _patient_key(g, seed)
        by_patient.setdefault(key, []).append(g.series_instance_uid)
        without_id += not has_id
    sizes = role_sizes(len(by_patient))
    order = sorted(by_patient)
    # Contoured patients first for held-out (Dice needs contours there); the rest in hash order.
    with_contour = [p for p in order if any(u in contoured for u in by_patient[p])]
    held_contoured = with_contour[: max(1, len(with_contour) // 2)] if with_contour else []
    rest = [p for p in order if p not in held_contoured]
    roles: dict[str, list[str]] = {role: [] for role in ROLES}
    patients = {role: 0 for role in ROLES}
    queue = held_contoured + rest
    for role in ("held_out", "gate_calibration", "detector_validation", "train"):
        take, queue = queue[: sizes[role]], queue[sizes[role] :]
        for p in take:
            roles[role].extend(sorted(by_patient[p]))
        patients[role] = len(take)
    roles = {role: sorted(uids) for role, uids in roles.items()}
    return Split(
        roles=roles,
        patients=patients,
        seed=seed,
        series_without_patient_id=without_id,
        contoured=sorted(u for u in contoured if any(u in v for v in roles.values())),
        abnormal=sorted(g.series_instance_uid for g in abnormal),
        fingerprint=fingerprint(normals, abnormal, seed),
    )


def load_or_make_split(
    out: Path,
    normals: list[dicom_series.SeriesFiles],
    *,
    seed: int,
    contoured: set[str],
    abnormal: list[dicom_series.SeriesFiles],
) -> tuple[Split, bool]:
    """The split saved in `out/split.json` when it was made from the same data and seed, else a new one
    (written there). Returns (split, whether it was reused).

    Raises:
        TooFewNormals: see `split_patients`.
    """
    path = out / SPLIT_FILE
    expected = fingerprint(normals, abnormal, seed)
    if path.is_file():
        try:
            saved = Split.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
        else:
            if saved.fingerprint == expected:
                return saved, True
            log.warning("%s was made from other series or another seed; splitting again", path)
    split = split_patients(normals, seed=seed, contoured=contoured, abnormal=abnormal)
    path.write_text(json.dumps(split.as_json(), indent=1) + "\n")
    return split, False
