"""The training pool as a folder for the trainers, and the registration of what they made.

The pool comes from the configured database (`service.contours.export_pool`, the layout
`gatekeeper pool export DIR` writes: CT series plus a liver DICOM-SEG each, and `pool.json`), or
from a folder given with `--pool-dir` (such an export, or any folder tree of CT series with liver
contours, e.g. phantom series with their ground truth). A retrain registers its model folder as a
candidate (`service.model_registry.register`) with the pool entry ids and the base data hash.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import ModelKind
from service.errors import UsageError
from service.model_registry import ModelRecord, RegistryError, ensure_active, register, verify_files
from service.settings import Settings

log = logging.getLogger(__name__)

#: Sub-folder of `--out` that a pool exported from the database is written to.
EXPORT_FOLDER = "pool"


@dataclass(frozen=True)
class Pool:
    """Where the pool's series lie and what they are.

    Attributes:
        folder: folder tree of CT series with liver contours.
        source: "database" (exported from the configured database) or the folder given.
        entry_ids: the `pool_entry` ids exported (from `pool.json`; empty for a plain folder).
        kinds: anomaly types of the series when a phantom `manifest.json` names them (else empty).
    """

    folder: Path
    source: str
    entry_ids: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def anomaly_type(entry: dict[str, Any] | None) -> str:
    """The anomaly type a phantom manifest entry names ("normal" for none, "unknown" without an entry)."""
    if entry is None:
        return "unknown"
    anomaly = entry.get("anomaly")
    if isinstance(anomaly, dict):
        return str(anomaly.get("type") or "normal")
    return str(anomaly) if anomaly else "normal"


def pool_from_folder(folder: Path) -> Pool:
    """The pool in `folder` (an export with `pool.json`, or a phantom run with `manifest.json`, or neither).

    Raises:
        UsageError: `folder` is not a folder.
    """
    if not folder.is_dir():
        raise UsageError(f"--pool-dir {folder}: no such folder")
    entries = _read_json(folder / "pool.json").get("entries") or []
    ids = [int(e["pool_entry_id"]) for e in entries if isinstance(e, dict) and "pool_entry_id" in e]
    series = _read_json(folder / "manifest.json").get("series") or []
    kinds = sorted({anomaly_type(e) for e in series if isinstance(e, dict)} - {"normal"})
    return Pool(folder=folder, source=str(folder.resolve()), entry_ids=ids, kinds=kinds)


def find_pool(
    *, args: argparse.Namespace, sessions: sessionmaker[Session], settings: Settings, out: Path | None = None
) -> Pool:
    """The pool to train on: `args.pool_dir`, else the database's pool exported to `out` (default `args.out/pool`).

    Raises:
        UsageError: the folder does not exist, or the database's pool is empty.
    """
    if args.pool_dir is not None:
        return pool_from_folder(Path(args.pool_dir))
    from service.contours import export_pool

    out = out or Path(args.out) / EXPORT_FOLDER
    if out.is_dir() and (out / "pool.json").is_file():
        shutil.rmtree(out)  # an earlier export of ours: export anew, the pool may have grown
    log.info("exporting the training pool from the database to %s", out)
    try:
        exported = export_pool(sessions=sessions, settings=settings, out=out, progress=log.info)
    except (FileExistsError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if not exported:
        raise UsageError(
            "the training pool is empty: no returned contour has been matched yet (`gatekeeper pool list`)"
        )
    return Pool(folder=out, source="database", entry_ids=[int(e["pool_entry_id"]) for e in exported])


def active_folder(*, sessions: sessionmaker[Session], settings: Settings, kind: ModelKind) -> tuple[ModelRecord, Path]:
    """The active version of `kind` (the shipped one registered on first use) and its checked folder.

    Raises:
        UsageError: there is none and the settings' model cannot be registered, or its files changed.
    """
    try:
        record = ensure_active(sessions=sessions, settings=settings, kind=kind)
        return record, verify_files(record, settings)
    except RegistryError as exc:
        raise UsageError(str(exc)) from None


def register_candidate(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    kind: ModelKind,
    folder: Path,
    actor: str | None,
    training_data: dict[str, Any],
) -> ModelRecord:
    """Register the trained model in `folder` as a candidate of `kind` with its training data.

    Raises:
        UsageError: the registry refuses it (the message says why).
    """
    from service.commands.models import default_actor

    try:
        record, _ = register(
            sessions=sessions,
            settings=settings,
            kind=kind,
            folder=folder,
            actor=actor or default_actor(),
            training_data=training_data,
        )
    except RegistryError as exc:
        raise UsageError(str(exc)) from None
    return record
