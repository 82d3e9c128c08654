"""`gatekeeper models ...`: the model registry — list, register, promote, roll back (`service.model_registry`).

    gatekeeper models list [--kind KIND] [--json]     # every version: kind, version, status, who, when
    gatekeeper models register KIND DIR [--by NAME]   # a candidate (its files copied under storage_dir)
    gatekeeper models promote KIND VERSION [--by NAME]  # active from the workers' next task; old one retired
    gatekeeper models rollback KIND [--by NAME]       # the version the active one replaced is active again

KIND is segmenter, detector or gate. `--by` defaults to the login name of whoever runs the command.
The first use on an empty registry registers the settings' detector and segmenter as the active
versions. The database comes from `GATEKEEPER_DATABASE_URL`; an unreachable or un-migrated database
ends the command with one line and exit code 2, as does an impossible request.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import ModelKind
from service.errors import UsageError
from service.settings import Settings, load_settings_or_exit

log = logging.getLogger(__name__)

KINDS = tuple(k.value for k in ModelKind)


def default_actor() -> str:
    """The login name of whoever runs the command (`$USER`, `$LOGNAME`, else the account's name)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `gatekeeper models` and its subcommands to the top-level parser."""
    models = subparsers.add_parser(
        "models", help="the model registry: list, register, promote and roll back model versions"
    )
    commands = models.add_subparsers(dest="models_command", metavar="MODELS_COMMAND", required=True)

    listing = commands.add_parser("list", help="every registered version, by kind")
    listing.add_argument("--kind", choices=KINDS, help="only this kind")
    listing.add_argument("--json", action="store_true", help="a JSON list (kind, version, status, hash, training …)")
    listing.set_defaults(func=run_list)

    add = commands.add_parser("register", help="register the model in DIR as a candidate")
    add.add_argument("kind", metavar="KIND", choices=KINDS, help=" | ".join(KINDS))
    add.add_argument("folder", metavar="DIR", type=Path, help="model folder (model.json + ONNX files; gate.json)")
    add.add_argument("--by", default=None, help="who registers it (default: your login name)")
    add.add_argument("--json", action="store_true", help="print the record as JSON")
    add.set_defaults(func=run_register)

    promote = commands.add_parser("promote", help="make VERSION the active one; the active one is retired")
    promote.add_argument("kind", metavar="KIND", choices=KINDS, help=" | ".join(KINDS))
    promote.add_argument("version", metavar="VERSION", help="a registered version (see `models list`)")
    promote.add_argument("--by", default=None, help="who promotes it (default: your login name)")
    promote.set_defaults(func=run_promote)

    rollback = commands.add_parser("rollback", help="make the version the active one replaced active again")
    rollback.add_argument("kind", metavar="KIND", choices=KINDS, help=" | ".join(KINDS))
    rollback.add_argument("--by", default=None, help="who rolls back (default: your login name)")
    rollback.set_defaults(func=run_rollback)


def _ensure_shipped(sessions: sessionmaker[Session], settings: Settings) -> None:
    """Register the settings' detector and segmenter as active where a kind has none (first use)."""
    from service.model_registry import RegistryError, ensure_active

    for kind in (ModelKind.DETECTOR, ModelKind.SEGMENTER):
        try:
            ensure_active(sessions=sessions, settings=settings, kind=kind)
        except RegistryError as exc:
            log.warning("no active %s registered, and the settings' one cannot be: %s", kind.value, exc)


def run_list(args: argparse.Namespace) -> int:
    """Print every registered version (first use: the shipped ones, registered as active)."""
    from service.db.schema import open_database
    from service.model_registry import list_models

    settings = load_settings_or_exit()
    with open_database(settings) as sessions:
        _ensure_shipped(sessions, settings)
        with sessions() as session:
            records = list_models(session=session, kind=ModelKind(args.kind) if args.kind else None)
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=1))
        return 0
    if not records:
        print("no model registered")
        return 0
    print(
        f"{'kind':<10} {'version':<18} {'status':<10} {'registered (UTC)':<17} {'promoted (UTC)':<17} {'by':<12} pool"
    )
    for r in records:
        promoted = r.promoted_at.strftime("%Y-%m-%d %H:%M") if r.promoted_at else "-"
        pool = r.training_data.get("pool_series", len(r.training_data.get("pool_entry_ids") or []))
        print(
            f"{r.kind:<10} {r.version:<18} {r.status:<10} {r.registered_at.strftime('%Y-%m-%d %H:%M'):<17} "
            f"{promoted:<17} {(r.promoted_by or r.registered_by):<12} {pool}"
        )
    return 0


def run_register(args: argparse.Namespace) -> int:
    """Register a model folder as a candidate; print its version."""
    from service.db.schema import open_database
    from service.model_registry import RegistryError
    from service.model_registry import register as register_model

    settings = load_settings_or_exit()
    kind = ModelKind(args.kind)
    with open_database(settings) as sessions:
        _ensure_shipped(sessions, settings)
        try:
            record, new = register_model(
                sessions=sessions, settings=settings, kind=kind, folder=args.folder, actor=args.by or default_actor()
            )
        except RegistryError as exc:
            raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(record.to_json(), indent=1))
    else:
        state = "registered" if new else "already registered"
        print(f"{kind.value} {record.version} {state} ({record.status}); promote with `gatekeeper models promote`")
    return 0


def run_promote(args: argparse.Namespace) -> int:
    """Make a registered version active."""
    from service.db.schema import open_database
    from service.model_registry import RegistryError, promote

    settings = load_settings_or_exit()
    kind = ModelKind(args.kind)
    with open_database(settings) as sessions:
        _ensure_shipped(sessions, settings)
        try:
            record = promote(sessions=sessions, kind=kind, version=args.version, actor=args.by or default_actor())
        except RegistryError as exc:
            raise UsageError(str(exc)) from None
    print(
        f"{kind.value} {record.version} is active (promoted by {record.promoted_by}); workers use it from their next task"
    )
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    """Make the version the active one replaced active again."""
    from service.db.schema import open_database
    from service.model_registry import RegistryError, rollback

    settings = load_settings_or_exit()
    kind = ModelKind(args.kind)
    with open_database(settings) as sessions:
        _ensure_shipped(sessions, settings)
        try:
            restored, rolled_back = rollback(sessions=sessions, kind=kind, actor=args.by or default_actor())
        except RegistryError as exc:
            raise UsageError(str(exc)) from None
    print(f"{kind.value} {restored.version} is active again ({rolled_back.version} retired)")
    return 0
