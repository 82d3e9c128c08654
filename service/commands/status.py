"""`gatekeeper status [--json]`: one screen for the on-call person.

    gatekeeper status [--json]

What it shows: series versions per state with the oldest in each; series stuck in a working
state; messages waiting in each broker queue; failed and pending exports; free disk against the
listener's reserve; the detector's and segmenter's versions; the active gate's version and the
population it was calibrated on (the shipped phantom mix, or the site's own series). Each problem that needs a person is a
*finding*, listed at the end.

There is no worker heartbeat: a worker that died or hangs shows as series that stay in a working
state (`scoring`, `scored`, `segmenting`) longer than `pipeline_stuck_after_s`, or that wait for a
worker longer than that. Those are the signal, and the output says so.

Exit codes: 0 nothing needs a person; 1 at least one finding (stuck series, failed exports, broker
unreachable, disk near its reserve, a model folder unreadable); 2 the database is unreachable or
not migrated, or a usage error (one line on stderr).

Nothing here prints patient data: internal ids, states, ages, counts, queue names, versions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import Export, ExportState, Series, utc_now
from service.lifecycle import FINAL_STATES, WORKING_STATES, SeriesState
from service.settings import Settings, load_settings_or_exit

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NEEDS_A_PERSON = 1
#: Free space under this multiple of the listener's reserve is a finding (stores stop at 1.0).
DISK_WARNING_FACTOR = 1.25
BROKER_TIMEOUT_S = 3.0
#: The broker queues, by the setting that names each.
QUEUE_SETTINGS = ("pipeline_queue", "score_queue", "segment_queue", "export_queue")
HEARTBEAT_NOTE = (
    "no worker heartbeat is tracked: a dead or hung worker shows as series stuck in a working state "
    "or waiting for a worker longer than pipeline_stuck_after_s"
)


@dataclass(frozen=True)
class Finding:
    """Something that needs a person: `code` for scripts, `message` for the on-call person."""

    code: str
    message: str


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `gatekeeper status` to the top-level parser."""
    status = subparsers.add_parser(
        "status",
        help="one screen for the on-call person: queues, stuck series, failed exports, disk, models",
        description="Exit code 0: nothing needs a person; 1: something does (listed); 2: database not ready.",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the status; exit 1 when a finding needs a person.

    Raises:
        DatabaseNotReady: the database does not answer or is not migrated (exit 2, one line).
    """
    from service.db.schema import open_database

    settings = load_settings_or_exit()
    with open_database(settings) as sessions:
        report = collect_status(settings=settings, sessions=sessions, broker=broker_queue_depths(settings))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    return EXIT_NEEDS_A_PERSON if report["findings"] else EXIT_OK


def broker_queue_depths(settings: Settings) -> dict[str, int] | str:
    """Messages waiting in each broker queue, by queue name; or why the broker did not answer."""
    from kombu.connection import Connection
    from kombu.exceptions import ChannelError

    options: dict[str, float] = {}
    if settings.broker_url.startswith(("redis://", "rediss://")):  # other transports refuse these options
        options = {"socket_connect_timeout": BROKER_TIMEOUT_S, "socket_timeout": BROKER_TIMEOUT_S}
    depths: dict[str, int] = {}
    try:
        # kombu's Connection.__init__ is unannotated
        with Connection(  # type: ignore[no-untyped-call]
            settings.broker_url, connect_timeout=BROKER_TIMEOUT_S, transport_options=options
        ) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=BROKER_TIMEOUT_S)
            for name in dict.fromkeys(str(getattr(settings, s)) for s in QUEUE_SETTINGS):
                channel = connection.channel()
                try:
                    _, count, _ = channel.queue_declare(queue=name, passive=True)
                    depths[name] = int(count)
                except ChannelError:  # the queue does not exist yet: nothing was ever left in it
                    depths[name] = 0
                finally:
                    channel.close()
    except Exception as exc:  # noqa: BLE001 — any transport's error means "unreachable"; reported as a finding
        log.debug("broker check failed", exc_info=True)
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return depths


def collect_status(
    *,
    settings: Settings,
    sessions: sessionmaker[Session],
    broker: dict[str, int] | str,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """The status as plain data (what `--json` prints); `broker`: queue depths, or why it is unreachable."""
    now = now or utc_now()
    findings: list[Finding] = []
    series = _series_status(sessions=sessions, stuck_after=settings.pipeline_stuck_after_s, now=now, findings=findings)
    exports = _export_status(sessions=sessions, now=now, findings=findings)
    if isinstance(broker, str):
        findings.append(Finding("broker_unreachable", f"broker unreachable: {broker}"))
    disk = _disk_status(settings, findings)
    models = _model_status(settings, findings)
    gate = _gate_status(settings=settings, sessions=sessions, findings=findings)
    return {
        "generated_at": now.isoformat(),
        **series,
        "worker_heartbeat": HEARTBEAT_NOTE,
        "broker": {"reachable": not isinstance(broker, str), "queues": broker if isinstance(broker, dict) else {}},
        "exports": exports,
        "disk": disk,
        "models": models,
        "gate": gate,
        "findings": [asdict(f) for f in findings],
        "needs_attention": bool(findings),
    }


def _series_status(
    *, sessions: sessionmaker[Session], stuck_after: float, now: dt.datetime, findings: list[Finding]
) -> dict[str, Any]:
    """`series` (count and oldest age per state), `stuck_series` and `waiting_for_worker`; findings for both."""
    # Imported when run, not when `gatekeeper` builds its parser: they load prometheus_client, which
    # `gatekeeper listen` and `worker` must only load after exporting their metrics folder.
    from service.metrics import WAITING_STATES, state_since, waiting_since

    current = Series.superseded.is_(False)
    with sessions() as session:
        by_state = session.execute(
            select(Series.state, func.count(), func.min(state_since())).where(current).group_by(Series.state)
        ).all()
        stuck_rows = session.execute(
            select(Series.id, Series.state, state_since())
            .where(current, Series.state.in_([s.value for s in WORKING_STATES]))
            .order_by(state_since())
        ).all()
        waiting_rows = session.execute(
            select(Series.id, Series.state, waiting_since())
            .where(current, Series.state.in_([s.value for s in WAITING_STATES]))
            .order_by(waiting_since())
        ).all()

    series = {
        state: {"count": count, "oldest_age_s": _age(since, now)}
        for state, count, since in sorted(by_state, key=lambda row: list(SeriesState).index(SeriesState(row[0])))
    }
    stuck = [
        {"series_id": series_id, "state": state, "age_s": _age(since, now)}
        for series_id, state, since in stuck_rows
        if since is not None and (now - since).total_seconds() > stuck_after
    ]
    if stuck:
        findings.append(
            Finding(
                "stuck_series",
                f"{len(stuck)} series stuck in a working state for more than {_duration(stuck_after)} "
                f"(worker dead or hung?): "
                + ", ".join(f"id {s['series_id']} {s['state']} {_duration(s['age_s'])}" for s in stuck[:10])
                + (" ..." if len(stuck) > 10 else ""),
            )
        )
    not_taken = [
        {"series_id": series_id, "state": state, "age_s": _age(since, now)}
        for series_id, state, since in waiting_rows
        if since is not None and (now - since).total_seconds() > stuck_after
    ]
    if not_taken:
        findings.append(
            Finding(
                "no_worker",
                f"{len(not_taken)} series waiting for a worker for more than {_duration(stuck_after)} "
                f"(no worker on the queue, or the broker lost them); oldest: id {not_taken[0]['series_id']} "
                f"{_duration(not_taken[0]['age_s'])}",
            )
        )
    return {
        "series": series,
        "stuck_series": stuck,
        "waiting_for_worker": {
            "count": len(waiting_rows),
            "oldest_age_s": _age(waiting_rows[0][2], now) if waiting_rows else None,
        },
    }


def _export_status(*, sessions: sessionmaker[Session], now: dt.datetime, findings: list[Finding]) -> dict[str, Any]:
    """Failed exports (a finding) and the pending ones' count and oldest age."""
    from service.pacs_export import list_exports

    with sessions() as session:
        pending, oldest_pending = session.execute(
            select(func.count(), func.min(Export.pending_since)).where(Export.state == ExportState.PENDING.value)
        ).one()
    failed = [
        {key: row[key] for key in ("id", "series_id", "attempts", "last_status", "last_reason", "destination")}
        for row in list_exports(sessions=sessions, state=ExportState.FAILED)
    ]
    if failed:
        findings.append(
            Finding(
                "failed_exports",
                f"{len(failed)} export(s) to the PACS failed (`gatekeeper exports retry ID` once fixed): "
                + "; ".join(f"export {e['id']}: {e['last_reason'] or e['last_status']}" for e in failed[:5])
                + (" ..." if len(failed) > 5 else ""),
            )
        )
    return {"failed": failed, "pending": pending, "oldest_pending_age_s": _age(oldest_pending, now)}


def _disk_status(settings: Settings, findings: list[Finding]) -> dict[str, Any]:
    """Free space on the storage disk against the listener's reserve; a finding near or past it."""
    from service.metrics import disk_space

    try:
        space = disk_space(settings)
    except OSError as exc:
        findings.append(Finding("disk_unreadable", f"cannot read the storage disk: {exc}"))
        return {"path": str(settings.storage_dir), "problem": str(exc)}
    if space.free_bytes < DISK_WARNING_FACTOR * space.reserve_bytes:
        findings.append(
            Finding(
                "disk_low",
                f"{_bytes(space.free_bytes)} free under {space.path}; the listener refuses stores below "
                f"{_bytes(space.reserve_bytes)}",
            )
        )
    return {
        "path": str(space.path),
        "free_bytes": space.free_bytes,
        "total_bytes": space.total_bytes,
        "reserve_bytes": space.reserve_bytes,
    }


def _model_status(settings: Settings, findings: list[Finding]) -> list[dict[str, Any]]:
    """The detector's and segmenter's versions; a finding for an unreadable model folder."""
    from service.metrics import model_versions

    models = []
    for version in model_versions(settings):
        models.append(
            {
                "model": version.model,
                "name": version.name,
                "version": version.version,
                "model_dir": str(version.model_dir),
                "problem": version.problem,
            }
        )
        if version.problem and not (version.model == "segmenter" and settings.segmentation_mode == "forward"):
            findings.append(Finding("model_unreadable", f"{version.model} model: {version.problem}"))
    return models


def _gate_status(*, settings: Settings, sessions: sessionmaker[Session], findings: list[Finding]) -> dict[str, Any]:
    """The active gate's version and the population it was calibrated on (`calibration_population`).

    A gate.json that cannot be read is a finding (every series' segment task would fail on it).
    """
    # Imported when run: the gate package loads scipy, which building `gatekeeper`'s parser need not.
    from service.calibration_population import read_active_gate

    with sessions() as session:
        gate = read_active_gate(session=session, settings=settings)
    if gate.problem:
        findings.append(Finding("gate_unreadable", f"gate: {gate.problem}"))
    return gate.to_json()


def format_report(report: dict[str, Any]) -> str:
    """The status as one screen of text."""
    lines = [f"CT Gatekeeper status at {report['generated_at'][:19]}Z", "", "Series (current versions):"]
    if not report["series"]:
        lines.append("  none")
    for state, row in report["series"].items():
        final = state in {s.value for s in FINAL_STATES}
        oldest = "" if final or row["oldest_age_s"] is None else f"oldest {_duration(row['oldest_age_s'])}"
        lines.append(f"  {state:<14}{row['count']:>7}  {oldest}".rstrip())
    waiting = report["waiting_for_worker"]
    lines.append(
        f"Waiting for a worker: {waiting['count']}"
        + (f" (oldest {_duration(waiting['oldest_age_s'])})" if waiting["oldest_age_s"] is not None else "")
    )
    lines.append(f"Stuck in a working state: {len(report['stuck_series'])}")
    lines.append(f"  ({report['worker_heartbeat']})")
    broker = report["broker"]
    if broker["reachable"]:
        lines.append("Broker queues: " + ", ".join(f"{name} {count}" for name, count in broker["queues"].items()))
    else:
        lines.append("Broker queues: broker unreachable")
    exports = report["exports"]
    lines.append(
        f"Exports: {len(exports['failed'])} failed, {exports['pending']} pending"
        + (f" (oldest {_duration(exports['oldest_pending_age_s'])})" if exports["oldest_pending_age_s"] else "")
    )
    disk = report["disk"]
    if "free_bytes" in disk:
        lines.append(
            f"Disk: {_bytes(disk['free_bytes'])} free of {_bytes(disk['total_bytes'])} under {disk['path']}; "
            f"stores refused below {_bytes(disk['reserve_bytes'])}"
        )
    else:
        lines.append(f"Disk: unreadable ({disk['problem']})")
    gate = report.get("gate")
    if gate:
        lines.append(f"Gate: {gate['version']} ({gate['source']}); calibrated on {gate['calibrated_on']}")
    for model in report["models"]:
        lines.append(
            f"Model {model['model']}: "
            + (
                f"{model['name']} version {model['version']}"
                if model["version"]
                else f"unreadable ({model['problem']})"
            )
        )
    lines.append("")
    if report["findings"]:
        lines.append("NEEDS A PERSON:")
        lines.extend(f"  - {finding['message']}" for finding in report["findings"])
    else:
        lines.append("OK: nothing needs a person.")
    return "\n".join(lines)


def _age(since: dt.datetime | None, now: dt.datetime) -> float | None:
    return None if since is None else round(max(0.0, (now - since).total_seconds()), 1)


def _duration(seconds: float | None) -> str:
    """A short age for people: 45 s, 12 min, 3 h 5 min, 2 d 4 h."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"  # pragma: no cover
