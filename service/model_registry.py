"""The model registry: every segmenter, detector and gate version the gatekeeper knows, and which one is active.

A version is registered from a model folder (`register`): its files — model.json (gate.json for a
gate) and every ONNX file — are hashed (`model_hash`) and copied, unchanged from then on, to
`storage_dir/models/<kind>/<version>/`; a row in `model_version` records the hash, the folder, the
training data (pool entries and base data hash), the model's own validation numbers and a status:

* `candidate` — registered (a retrain registers its result so), not used by the pipeline;
* `active` — the version every worker loads for its next task (at most one per kind, a database
  constraint); `promote` makes a version active and retires the one it replaces, and remembers it;
* `retired` — replaced; `rollback` makes the version the active one replaced active again.

The models shipped with the code (`Settings.detector_model_dir`, `Settings.segmenter_model_dir`,
`Settings.gate_model_dir` when it holds a gate.json) are registered and made active on first use when a kind has no active version (`ensure_active`),
so an existing install keeps working; from then on the registry, not the settings, says which
version runs. Who did what and when is in `model_event`. No patient data anywhere here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import ModelEvent, ModelKind, ModelStatus, ModelVersion, utc_now
from service.settings import Settings

log = logging.getLogger(__name__)

#: Longest actor name stored (`ModelVersion.promoted_by`, `ModelEvent.actor`).
MAX_ACTOR_LENGTH = 64
#: The folder under `Settings.storage_dir` that holds the registered models' files.
MODELS_FOLDER = "models"


class RegistryError(ValueError):
    """A registry request that cannot be done; the message says why in one line (the CLI shows it, exit 2)."""


@dataclass(frozen=True)
class ModelRecord:
    """One registered model version, detached from the database (what commands print, workers load)."""

    id: int
    kind: str
    version: str
    sha256: str
    path: str
    status: str
    training_data: dict[str, Any]
    metrics: dict[str, Any]
    registered_at: dt.datetime
    registered_by: str
    promoted_at: dt.datetime | None
    promoted_by: str | None
    retired_at: dt.datetime | None
    replaced_id: int | None

    @classmethod
    def of(cls, row: ModelVersion) -> ModelRecord:
        return cls(
            id=row.id,
            kind=row.kind,
            version=row.version,
            sha256=row.sha256,
            path=row.path,
            status=row.status,
            training_data=dict(row.training_data or {}),
            metrics=dict(row.metrics or {}),
            registered_at=row.registered_at,
            registered_by=row.registered_by,
            promoted_at=row.promoted_at,
            promoted_by=row.promoted_by,
            retired_at=row.retired_at,
            replaced_id=row.replaced_id,
        )

    def folder(self, settings: Settings) -> Path:
        """The model's folder: `path`, relative to `storage_dir` unless absolute."""
        path = Path(self.path)
        return path if path.is_absolute() else settings.storage_dir / path

    def to_json(self) -> dict[str, Any]:
        def when(value: dt.datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "id": self.id,
            "kind": self.kind,
            "version": self.version,
            "status": self.status,
            "sha256": self.sha256,
            "path": self.path,
            "training_data": self.training_data,
            "metrics": self.metrics,
            "registered_at": when(self.registered_at),
            "registered_by": self.registered_by,
            "promoted_at": when(self.promoted_at),
            "promoted_by": self.promoted_by,
            "retired_at": when(self.retired_at),
            "replaced_id": self.replaced_id,
        }


def parse_kind(value: str) -> ModelKind:
    """The `ModelKind` named `value` (any letter case).

    Raises:
        RegistryError: not segmenter, detector or gate.
    """
    try:
        return ModelKind(value.strip().lower())
    except ValueError:
        raise RegistryError(
            f"unknown model kind {value!r}; expected one of {', '.join(k.value for k in ModelKind)}"
        ) from None


# --- the files of a model -----------------------------------------------------------------------------


def _description_file(kind: ModelKind) -> str:
    return "gate.json" if kind == ModelKind.GATE else "model.json"


def model_files(kind: ModelKind, folder: Path) -> list[Path]:
    """The files that make a model version: its model.json (gate.json) and every `*.onnx` beside it, by name
    (for a gate, also the reference file its gate.json names).

    Raises:
        RegistryError: `folder` is not a folder or has no model.json (gate.json).
    """
    folder = Path(folder)
    description = folder / _description_file(kind)
    if not folder.is_dir():
        raise RegistryError(f"{folder}: no such folder")
    if not description.is_file():
        raise RegistryError(f"{folder}: no {description.name}; not a {kind.value} model folder")
    named = _gate_reference(description) if kind == ModelKind.GATE else []
    return [description, *sorted({*named, *(p for p in folder.glob("*.onnx") if p.is_file())})]


def _gate_reference(description: Path) -> list[Path]:
    """The reference file a gate.json names (`reference.file`, beside it), if any: part of the gate version.

    Raises:
        RegistryError: the file named is missing or not beside gate.json.
    """
    try:
        config = json.loads(description.read_text())
    except (OSError, ValueError):
        return []  # `describe` says what is wrong with it
    reference = config.get("reference") if isinstance(config, dict) else None
    name = reference.get("file") if isinstance(reference, dict) else None
    if not name:
        return []
    path = description.parent / str(name)
    if Path(str(name)).name != str(name) or not path.is_file():
        raise RegistryError(f"{description}: the reference file it names ({name!r}) is not beside it")
    return [path]


def model_hash(kind: ModelKind, folder: Path) -> str:
    """Hex SHA-256 over the names and bytes of `model_files(kind, folder)`.

    Raises:
        RegistryError: see `model_files`.
    """
    digest = hashlib.sha256()
    for path in model_files(kind, folder):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def _file_version(path: Path) -> str:
    """The first 16 hex digits of a file's SHA-256: the version the detector and segmenter report."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ModelDescription:
    """What a model folder says about itself: its version (as the loaded model reports it), numbers, training."""

    version: str
    metrics: dict[str, Any]
    training: dict[str, Any]


def describe(kind: ModelKind, folder: Path) -> ModelDescription:
    """Read and check a model folder's description.

    The version is the one the loaded model reports and results are recorded with: the segmenter's
    model.json `version`; the detector's model.json `version`, else the hash of its scorer file
    (`service.inference`); a gate's gate.json `version`, else the start of its hash.

    Raises:
        RegistryError: not a valid model folder of `kind` (the message names the problem).
    """
    files = model_files(kind, folder)
    try:
        if kind == ModelKind.SEGMENTER:
            from service.segmentation import read_model_json as read_segmenter

            meta = read_segmenter(folder)
            version = str(meta["version"])
        elif kind == ModelKind.DETECTOR:
            from service.inference import read_model_json as read_detector

            meta = read_detector(folder)
            scorer = meta["files"].get("scorer") or meta["files"].get("patch_scorer")
            if not scorer or not (Path(folder) / scorer).is_file():
                raise RegistryError(f"{folder}: the scorer file named in model.json is missing")
            version = str(meta.get("version") or _file_version(Path(folder) / scorer))
        else:
            meta = json.loads(files[0].read_text())
            if not isinstance(meta, dict):
                raise RegistryError(f"{files[0]}: not a JSON object")
            version = str(meta.get("version") or model_hash(kind, folder)[:16])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, RegistryError):
            raise
        raise RegistryError(f"{folder}: not a usable {kind.value} model: {exc}") from None
    if not version or len(version) > 64:
        raise RegistryError(f"{folder}: version {version!r} must have 1 to 64 characters")
    metrics = dict(meta.get("metrics") or {})
    if "threshold" in meta and "threshold" not in metrics:
        metrics["threshold"] = meta["threshold"]
    return ModelDescription(version=version, metrics=metrics, training=dict(meta.get("training") or {}))


def _copy_into(files: Iterable[Path], target: Path) -> None:
    """Copy `files` into the new folder `target` through a temporary folder, so `target` is whole or absent."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for path in files:
        shutil.copy2(path, tmp / path.name)
    try:
        os.rename(tmp, target)
    except OSError:  # another process installed it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise


def verify_files(record: ModelRecord, settings: Settings) -> Path:
    """The folder of `record`, after checking that its files still hash to `record.sha256`.

    Raises:
        RegistryError: the folder is gone or its files changed since registration.
    """
    folder = record.folder(settings)
    found = model_hash(ModelKind(record.kind), folder)
    if found != record.sha256:
        raise RegistryError(
            f"{record.kind} {record.version}: the files in {folder} changed since registration "
            f"(sha256 {found[:12]}…, registered {record.sha256[:12]}…)"
        )
    return folder


# --- reading --------------------------------------------------------------------------------------------


def list_models(*, session: Session, kind: ModelKind | None = None) -> list[ModelRecord]:
    """Every registered version (of `kind`), by kind, then oldest first."""
    query = select(ModelVersion).order_by(ModelVersion.kind, ModelVersion.id)
    if kind is not None:
        query = query.where(ModelVersion.kind == kind.value)
    return [ModelRecord.of(row) for row in session.scalars(query)]


def active_model(*, session: Session, kind: ModelKind) -> ModelRecord | None:
    """The active version of `kind`, or None when there is none yet."""
    row = session.scalar(
        select(ModelVersion).where(ModelVersion.kind == kind.value, ModelVersion.status == ModelStatus.ACTIVE.value)
    )
    return ModelRecord.of(row) if row is not None else None


def find_model(*, session: Session, kind: ModelKind, version: str) -> ModelRecord | None:
    row = session.scalar(select(ModelVersion).where(ModelVersion.kind == kind.value, ModelVersion.version == version))
    return ModelRecord.of(row) if row is not None else None


# --- changing -------------------------------------------------------------------------------------------


def _actor(actor: str) -> str:
    actor = actor.strip()
    if not actor:
        raise RegistryError("who did it (--by) must not be empty")
    return actor[:MAX_ACTOR_LENGTH]


def register(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    kind: ModelKind,
    folder: Path,
    actor: str,
    training_data: dict[str, Any] | None = None,
) -> tuple[ModelRecord, bool]:
    """Register the model in `folder` as a candidate of `kind`; return (its record, whether it is new).

    The files are copied to `storage_dir/models/<kind>/<version>/`. `training_data` (pool entry ids,
    base data hash …) is stored as given; without it, the model.json's `training.data` and
    `training.data_hash` are recorded as the base data. Registering the same files again returns the
    existing record (idempotent).

    Raises:
        RegistryError: not a valid model folder, or its version is registered with other files.
    """
    actor = _actor(actor)
    folder = Path(folder)
    description = describe(kind, folder)
    sha256 = model_hash(kind, folder)
    with sessions() as session:
        existing = find_model(session=session, kind=kind, version=description.version)
    if existing is not None:
        if existing.sha256 != sha256:
            raise RegistryError(
                f"{kind.value} version {description.version} is already registered with other files "
                f"(sha256 {existing.sha256[:12]}…); give this model another version"
            )
        return existing, False
    relative = Path(MODELS_FOLDER) / kind.value / description.version
    target = settings.storage_dir / relative
    if not target.is_dir():
        _copy_into(model_files(kind, folder), target)
    if model_hash(kind, target) != sha256:
        raise RegistryError(f"{target} holds other files than {folder}; remove it or give this model another version")
    data = dict(training_data) if training_data is not None else {}
    if training_data is None:
        data = {"pool_entry_ids": [], "base_data": description.training.get("data")}
        data["base_data_hash"] = description.training.get("data_hash")
    data.setdefault("registered_from", str(folder.resolve()))
    try:
        with sessions.begin() as session:
            row = ModelVersion(
                kind=kind.value,
                version=description.version,
                sha256=sha256,
                path=relative.as_posix(),
                training_data=data,
                metrics=description.metrics,
                status=ModelStatus.CANDIDATE.value,
                registered_at=utc_now(),
                registered_by=actor,
            )
            session.add(row)
            session.flush()
            session.add(ModelEvent(model_version_id=row.id, action="registered", actor=actor, detail={}))
            record = ModelRecord.of(row)
    except IntegrityError:  # registered by another process meanwhile
        with sessions() as session:
            again = find_model(session=session, kind=kind, version=description.version)
        if again is None or again.sha256 != sha256:
            raise RegistryError(
                f"{kind.value} version {description.version} was registered meanwhile with other files"
            ) from None
        return again, False
    log.info("registered %s %s (sha256 %s…) by %s", kind.value, record.version, sha256[:12], actor)
    return record, True


def _locked_rows(session: Session, kind: ModelKind) -> list[ModelVersion]:
    """Every version of `kind`, locked for this transaction (PostgreSQL; SQLite serialises writers anyway)."""
    return list(
        session.scalars(
            select(ModelVersion).where(ModelVersion.kind == kind.value).order_by(ModelVersion.id).with_for_update()
        )
    )


def _activate(session: Session, *, current: ModelVersion | None, target: ModelVersion, actor: str) -> None:
    """Retire `current` (if any), then make `target` active: two statements, in that order (one active per kind)."""
    now = utc_now()
    if current is not None:
        session.execute(
            update(ModelVersion)
            .where(ModelVersion.id == current.id)
            .values(status=ModelStatus.RETIRED.value, retired_at=now)
            .execution_options(synchronize_session=False)
        )
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.id == target.id)
        .values(status=ModelStatus.ACTIVE.value, promoted_at=now, promoted_by=actor, retired_at=None)
        .execution_options(synchronize_session=False)
    )


def promote(*, sessions: sessionmaker[Session], kind: ModelKind, version: str, actor: str) -> ModelRecord:
    """Make `version` the active version of `kind`; the version active before is retired and remembered.

    Workers load it for their next task (no restart). A rollback (`rollback`) returns to the version
    it replaced.

    Raises:
        RegistryError: no such version, or it is already active.
    """
    actor = _actor(actor)
    with sessions.begin() as session:
        rows = _locked_rows(session, kind)
        target = next((r for r in rows if r.version == version), None)
        if target is None:
            raise RegistryError(f"no {kind.value} version {version!r} is registered (see `gatekeeper models list`)")
        if target.status == ModelStatus.ACTIVE.value:
            raise RegistryError(f"{kind.value} {version} is already active")
        current = next((r for r in rows if r.status == ModelStatus.ACTIVE.value), None)
        _activate(session, current=current, target=target, actor=actor)
        session.execute(
            update(ModelVersion)
            .where(ModelVersion.id == target.id)
            .values(replaced_id=current.id if current is not None else None)
            .execution_options(synchronize_session=False)
        )
        detail = {"replaced": current.version if current is not None else None}
        session.add(ModelEvent(model_version_id=target.id, action="promoted", actor=actor, detail=detail))
        if current is not None:
            session.add(
                ModelEvent(model_version_id=current.id, action="retired", actor=actor, detail={"by_version": version})
            )
        target_id = target.id
    with sessions() as session:
        row = session.get(ModelVersion, target_id)
        assert row is not None
        record = ModelRecord.of(row)
    log.info("%s %s promoted by %s (replaces %s)", kind.value, version, actor, detail["replaced"])
    return record


def rollback(*, sessions: sessionmaker[Session], kind: ModelKind, actor: str) -> tuple[ModelRecord, ModelRecord]:
    """Make the version that the active one replaced active again; return (restored, rolled back).

    Raises:
        RegistryError: no active version of `kind`, or it replaced none (nothing to return to).
    """
    actor = _actor(actor)
    with sessions.begin() as session:
        rows = _locked_rows(session, kind)
        current = next((r for r in rows if r.status == ModelStatus.ACTIVE.value), None)
        if current is None:
            raise RegistryError(f"no {kind.value} is active; nothing to roll back")
        previous = next((r for r in rows if r.id == current.replaced_id), None)
        if previous is None:
            raise RegistryError(
                f"{kind.value} {current.version} replaced no earlier version; nothing to roll back to "
                "(promote a version instead)"
            )
        _activate(session, current=current, target=previous, actor=actor)
        session.add(
            ModelEvent(model_version_id=current.id, action="rolled_back", actor=actor, detail={"to": previous.version})
        )
        session.add(
            ModelEvent(model_version_id=previous.id, action="restored", actor=actor, detail={"from": current.version})
        )
        ids = (previous.id, current.id)
    with sessions() as session:
        restored, rolled_back = (session.get(ModelVersion, i) for i in ids)
        assert restored is not None and rolled_back is not None
        result = ModelRecord.of(restored), ModelRecord.of(rolled_back)
    log.info("%s rolled back from %s to %s by %s", kind.value, result[1].version, result[0].version, actor)
    return result


def shipped_folder(settings: Settings, kind: ModelKind) -> Path:
    """The folder of the model of `kind` that the settings name (the shipped one unless changed)."""
    if kind == ModelKind.DETECTOR:
        return settings.detector_model_dir
    if kind == ModelKind.SEGMENTER:
        return settings.segmenter_model_dir
    if kind == ModelKind.GATE:
        return settings.gate_model_dir
    raise RegistryError(f"no {kind.value} is shipped; register one with `gatekeeper models register`")


def ensure_active(
    *, sessions: sessionmaker[Session], settings: Settings, kind: ModelKind, actor: str = "gatekeeper"
) -> ModelRecord:
    """The active version of `kind`; when there is none yet, the settings' model (`shipped_folder`),
    registered and made active first (idempotent, safe when several processes do it at once).

    Raises:
        RegistryError: no active version and the settings' folder is no usable model of `kind`.
    """
    with sessions() as session:
        record = active_model(session=session, kind=kind)
    if record is not None:
        return record
    folder = shipped_folder(settings, kind)
    registered, _ = register(sessions=sessions, settings=settings, kind=kind, folder=folder, actor=actor)
    try:
        record = promote(sessions=sessions, kind=kind, version=registered.version, actor=actor)
        log.info("%s %s from %s is the active version (first use)", kind.value, record.version, folder)
        return record
    except (RegistryError, IntegrityError):  # another process made one active meanwhile
        with sessions() as session:
            again = active_model(session=session, kind=kind)
        if again is None:
            raise
        return again
