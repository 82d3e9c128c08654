"""Readiness checks of one gatekeeper installation, for `/readyz`.

Each check answers `CheckResult(name, "ok")` or `CheckResult(name, "failed", reason)`; none raises.
They name what an operator must fix: the database (reachable, migrated), the Celery broker, the
model files of the detector and segmenter, the active gate's gate.json (its `detail` also says which
population it was calibrated on), and free space on the disk holding `storage_dir`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from kombu.connection import Connection
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.calibration_population import read_active_gate
from service.settings import Settings
from service.web.schemas import CheckResult

log = logging.getLogger(__name__)

BROKER_TIMEOUT_S = 3.0

Check = Callable[[], CheckResult]


def check_database(sessions: sessionmaker[Session]) -> CheckResult:
    """ok when the database answers and has the worklist tables (`gatekeeper db upgrade` was run)."""
    try:
        with sessions() as session:
            session.execute(text("SELECT 1 FROM worklist_item WHERE 1 = 0"))
    except SQLAlchemyError as exc:
        log.warning("readiness: database check failed: %s", type(exc).__name__)
        orig = getattr(exc, "orig", None)  # set on DBAPIError, the usual case
        reason = str(orig if orig is not None else exc).splitlines()[0]
        return CheckResult(name="database", status="failed", reason=reason)
    return CheckResult(name="database", status="ok")


def check_broker(broker_url: str) -> CheckResult:
    """ok when the Celery broker accepts a connection within BROKER_TIMEOUT_S seconds."""
    options = {"socket_connect_timeout": BROKER_TIMEOUT_S, "socket_timeout": BROKER_TIMEOUT_S}
    try:
        # kombu's Connection.__init__ is unannotated
        with Connection(  # type: ignore[no-untyped-call]
            broker_url, connect_timeout=BROKER_TIMEOUT_S, transport_options=options
        ) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=BROKER_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 — any transport's error means "not reachable"; reported, not hidden
        log.warning("readiness: broker check failed: %s", type(exc).__name__)
        return CheckResult(name="broker", status="failed", reason=f"{type(exc).__name__}: {exc}")
    return CheckResult(name="broker", status="ok")


def check_model_dir(name: str, model_dir: Path) -> CheckResult:
    """ok when `model_dir` has a readable model.json and every file it names ("file" or "files") exists."""
    path = Path(model_dir) / "model.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return CheckResult(name=name, status="failed", reason=f"{path}: {exc}")
    files = list((meta.get("files") or {}).values()) + ([meta["file"]] if isinstance(meta.get("file"), str) else [])
    if not files:
        return CheckResult(name=name, status="failed", reason=f"{path} names no model file")
    missing = [f for f in files if not (Path(model_dir) / f).is_file()]
    if missing:
        return CheckResult(name=name, status="failed", reason=f"{model_dir}: missing {', '.join(missing)}")
    return CheckResult(name=name, status="ok")


def check_gate_dir(gate_dir: Path) -> CheckResult:
    """ok when `gate_dir` holds no gate.json (the rules-only gate) or one the gate loads: fields, reference
    file and its SHA-256 (a gate.json that does not load would fail every series' segment task)."""
    from service.gate import Gate

    if not (Path(gate_dir) / "gate.json").is_file():
        return CheckResult(name="gate", status="ok")
    try:
        Gate.load(gate_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return CheckResult(name="gate", status="failed", reason=str(exc).splitlines()[0])
    return CheckResult(name="gate", status="ok")


def check_active_gate(sessions: sessionmaker[Session], settings: Settings) -> CheckResult:
    """`check_gate_dir` on the gate the pipeline uses (the registry's active version, else the settings'
    folder), with `detail`: its version, where it came from and the population it was calibrated on."""
    try:
        with sessions() as session:
            gate = read_active_gate(session=session, settings=settings)
    except SQLAlchemyError as exc:
        log.warning("readiness: cannot read the active gate version: %s", type(exc).__name__)
        return CheckResult(name="gate", status="failed", reason="cannot read the active gate version (database)")
    result = check_gate_dir(gate.folder) if gate.folder is not None else CheckResult(name="gate", status="ok")
    return result.model_copy(update={"detail": gate.to_json()})


def check_disk(storage_dir: Path, *, min_free_bytes: int, max_used_fraction: float) -> CheckResult:
    """ok when the disk holding `storage_dir` has the free space the listener needs to accept stores."""
    try:
        usage = shutil.disk_usage(storage_dir)
    except OSError as exc:
        return CheckResult(name="disk", status="failed", reason=f"{storage_dir}: {exc}")
    used = (usage.total - usage.free) / usage.total if usage.total else 1.0
    if usage.free < min_free_bytes:
        return CheckResult(
            name="disk",
            status="failed",
            reason=f"{usage.free} bytes free under {storage_dir}; expected at least {min_free_bytes}",
        )
    if used > max_used_fraction:
        return CheckResult(
            name="disk",
            status="failed",
            reason=f"{used:.1%} of the disk under {storage_dir} used; expected at most {max_used_fraction:.0%}",
        )
    return CheckResult(name="disk", status="ok")


def readiness_checks(settings: Settings, sessions: sessionmaker[Session]) -> list[Check]:
    """The checks `/readyz` runs, in the order it reports them."""
    return [
        lambda: check_database(sessions),
        lambda: check_broker(settings.broker_url),
        lambda: check_model_dir("detector_model", settings.detector_model_dir),
        lambda: check_model_dir("segmenter_model", settings.segmenter_model_dir),
        lambda: check_active_gate(sessions, settings),
        lambda: check_disk(
            settings.storage_dir,
            min_free_bytes=settings.min_free_disk_bytes,
            max_used_fraction=settings.max_disk_used_fraction,
        ),
    ]
