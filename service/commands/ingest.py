"""`gatekeeper listen`, `gatekeeper series` and `gatekeeper worker`: the ingest commands.

    gatekeeper listen [--ae-title T] [--bind ADDR] [--port P] [--allow-ae T ...] [--allow-ip CIDR ...]
                      [--metrics-port P]
    gatekeeper series [list] [--json]
    gatekeeper series complete SERIES_INSTANCE_UID [--json]
    gatekeeper worker [--queues Q1,Q2] [--hostname NAME@HOST] [--metrics-port P]

Flags override the settings (`GATEKEEPER_*`); the database and storage folder come from
`GATEKEEPER_DATABASE_URL` and `GATEKEEPER_STORAGE_DIR`. The listener refuses to start without an
allow-list of calling AE titles and of networks (fail closed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import Series
from service.errors import UsageError
from service.lifecycle import SeriesState
from service.settings import Settings, load_settings_or_exit

log = logging.getLogger(__name__)

#: The environment variable that puts prometheus_client in multiprocess mode (read at its first import).
PROMETHEUS_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `gatekeeper listen`, `gatekeeper series` and `gatekeeper worker` to the top-level parser."""
    listen = subparsers.add_parser("listen", help="receive CT series from a PACS (DICOM C-STORE listener)")
    listen.add_argument("--ae-title", help="our AE title (setting ae_title)")
    listen.add_argument("--bind", help="IP address to listen on (setting bind_address)")
    listen.add_argument("--port", type=int, help="TCP port (setting port)")
    listen.add_argument(
        "--allow-ae",
        action="append",
        metavar="TITLE",
        help="calling AE title allowed to send; repeatable; '*' for any (setting allowed_ae_titles)",
    )
    listen.add_argument(
        "--allow-ip",
        action="append",
        metavar="CIDR",
        help="network allowed to send, e.g. 10.1.0.0/16; repeatable (setting allowed_networks)",
    )
    listen.add_argument(
        "--processes",
        type=int,
        default=1,
        help="listener processes sharing the port (SO_REUSEPORT), to use more cores (default 1)",
    )
    listen.add_argument("--metrics-port", type=int, metavar="P", help=METRICS_PORT_HELP)
    listen.set_defaults(func=run_listen)

    series = subparsers.add_parser("series", help="list received series, or force one complete")
    series.add_argument("action", nargs="?", choices=["list", "complete"], default="list")
    series.add_argument("series_instance_uid", nargs="?", help="with 'complete': the SeriesInstanceUID")
    series.add_argument("--json", action="store_true", help="machine-readable output")
    series.set_defaults(func=run_series)

    worker = subparsers.add_parser("worker", help="run a pipeline worker (Celery): score, segment, export")
    worker.add_argument(
        "--queues",
        default="score,segment,export,default",
        metavar="Q1,Q2",
        help="which pipeline queues to take work from: score (GPU), segment, export, default "
        "(light); default all of them",
    )
    worker.add_argument(
        "--hostname",
        metavar="NAME@HOST",
        help="this worker's Celery node name, recorded in the series events of the work it does "
        "(%%h: the host name; default gatekeeper-<queues>-<pid>@%%h)",
    )
    worker.add_argument("--metrics-port", type=int, metavar="P", help=METRICS_PORT_HELP)
    worker.set_defaults(func=run_worker)


METRICS_PORT_HELP = (
    "also serve Prometheus metrics at http://ADDR:P/metrics (ADDR: setting metrics_bind_address, "
    "default 127.0.0.1; bearer token GATEKEEPER_METRICS_TOKEN when set)"
)


def use_metrics_dir(settings: Settings) -> None:
    """Put this process, and the listener processes it spawns, in prometheus_client's multiprocess mode.

    Their event counters then go to files in `settings.metrics_dir`, which every `/metrics` sums
    (`service.metrics`). Must run before prometheus_client is imported (before `service.metrics` and
    the modules that record events); if it already was, the counters stay in this process's memory
    and only this process's `--metrics-port` shows them.
    """
    if settings.metrics_dir is None:  # filled in by Settings
        return
    settings.metrics_dir.mkdir(parents=True, exist_ok=True)
    if "prometheus_client" in sys.modules:
        log.warning("metrics: prometheus_client already loaded; this process's counters stay in memory")
        return
    os.environ[PROMETHEUS_MULTIPROC_ENV] = str(settings.metrics_dir)


def _check_metrics_port(port: int | None) -> None:
    if port is not None and not 1 <= port <= 65535:
        raise UsageError(f"--metrics-port must be 1 to 65535, got {port}")


#: (argparse dest, Settings field) of the listener's flags, shared by `listen` and `serve`.
LISTENER_FLAGS = (
    ("ae_title", "ae_title"),
    ("bind", "bind_address"),
    ("port", "port"),
    ("allow_ae", "allowed_ae_titles"),
    ("allow_ip", "allowed_networks"),
)


def settings_values(args: argparse.Namespace, flags: tuple[tuple[str, str], ...] = LISTENER_FLAGS) -> dict[str, Any]:
    """The configured settings' values with the given flags applied (a flag that is set wins)."""
    base = load_settings_or_exit()
    overrides = {name: getattr(args, flag) for flag, name in flags if getattr(args, flag) is not None}
    return {**base.model_dump(), **overrides}


def validated_settings(values: dict[str, Any]) -> Settings:
    """`Settings` from `values`, validated like the environment.

    Raises:
        UsageError: a value is invalid (the message names the field).
    """
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise UsageError(f"invalid {'/'.join(map(str, error['loc']))}: {error['msg']}") from None


def listen_settings(args: argparse.Namespace) -> Settings:
    """The settings with the command-line flags applied (flags win); validated like the rest.

    Raises:
        UsageError: a flag value is invalid, or an allow-list is empty.
    """
    settings = validated_settings(settings_values(args))
    if not settings.allowed_ae_titles:
        raise UsageError(
            "no calling AE title is allowed: use --allow-ae TITLE or GATEKEEPER_ALLOWED_AE_TITLES ('*' for any)"
        )
    if not settings.allowed_networks:
        raise UsageError("no network is allowed: use --allow-ip CIDR or GATEKEEPER_ALLOWED_NETWORKS")
    return settings


def run_listen(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; stores in flight finish before the process ends."""
    settings = listen_settings(args)
    _check_metrics_port(args.metrics_port)
    use_metrics_dir(settings)  # before the imports below load prometheus_client
    from service.db.schema import check_database
    from service.ingest.listener import Listener
    from service.metrics import serve_metrics
    from service.pipeline.tasks import listener_jobs

    if not args.verbose:
        # pynetdicom narrates every association and message at INFO; our own lines say what matters.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    if args.processes < 1:
        raise UsageError(f"--processes must be >= 1, got {args.processes}")
    if args.processes > 1 and settings.database_url.startswith("sqlite"):
        raise UsageError("--processes > 1 needs PostgreSQL (GATEKEEPER_DATABASE_URL); SQLite has one writer")
    check_database(settings)  # one line and exit 2 if not migrated or not reachable, before any child starts
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    children = _start_extra_listeners(settings, args.processes - 1)
    try:
        publisher, sweepers = listener_jobs(settings)
        listener = Listener.start(settings, publisher=publisher, sweepers=sweepers, reuse_port=args.processes > 1)
    except OSError as exc:
        raise UsageError(f"cannot listen on {settings.bind_address}:{settings.port}: {exc}") from exc
    metrics_server = None
    try:
        if args.metrics_port is not None:
            try:
                metrics_server = serve_metrics(settings, listener.store.sessions, port=args.metrics_port)
            except OSError as exc:
                raise UsageError(
                    f"cannot serve metrics on {settings.metrics_bind_address}:{args.metrics_port}: {exc}"
                ) from exc
        stop.wait()
    finally:
        log.info("stopping listener")
        if metrics_server is not None:
            metrics_server.shutdown()
        listener.stop()
        for child in children:
            child.terminate()
            child.join(timeout=30)
    return 0


def _serve_extra(settings_json: str) -> None:
    """A child listener process: DICOM server only; the parent runs the assembler."""
    from service.ingest.listener import Listener
    from service.logs import configure_logging

    _die_with_parent()
    settings = Settings.model_validate_json(settings_json)
    configure_logging(int(logging.getLevelName(settings.log_level)))
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    listener = Listener.start(settings, run_assembler=False, reuse_port=True)
    stop.wait()
    listener.stop()


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the parent listener dies, even by SIGKILL, so no orphan keeps the port."""
    import ctypes
    import ctypes.util

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        log.warning("cannot ask to be stopped with the parent listener (not Linux?)")


def _start_extra_listeners(settings: Settings, count: int) -> list[Any]:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    children = []
    for _ in range(count):
        child = context.Process(target=_serve_extra, args=(settings.model_dump_json(),), daemon=True)
        child.start()
        children.append(child)
    return children


def series_rows(settings: Settings) -> list[dict[str, Any]]:
    """Every series version, newest first, with state and counts (no patient data).

    Raises:
        DatabaseNotReady: the database does not answer or is not migrated (`service.db.schema`).
    """
    from service.db.schema import open_database
    from service.db.tables import QuarantinedInstance, Series

    with open_database(settings) as sessions, sessions() as session:
        quarantined = dict(
            session.execute(
                select(QuarantinedInstance.series_id, func.count()).group_by(QuarantinedInstance.series_id)
            ).all()
        )
        rows = []
        for series in session.scalars(select(Series).order_by(Series.id.desc())):
            rows.append(
                {
                    "id": series.id,
                    "series_instance_uid": series.series_instance_uid,
                    "version": series.version,
                    "state": series.state,
                    "superseded": series.superseded,
                    "modality": series.modality,
                    "calling_ae_title": series.calling_ae_title,
                    "num_instances": series.num_instances,
                    "num_duplicates": series.num_duplicates,
                    "num_quarantined": quarantined.get(series.id, 0),
                    "queue_attempts": series.queue_attempts,
                    "geometry_findings": series.geometry_findings,
                    "first_received_at": series.first_received_at.isoformat(),
                    "last_received_at": series.last_received_at.isoformat(),
                    "completed_at": series.completed_at.isoformat() if series.completed_at else None,
                }
            )
        return rows


def run_series(args: argparse.Namespace) -> int:
    """List series, or force completion of one (`complete UID`); exit 1 if nothing was receiving."""
    settings = load_settings_or_exit()
    if args.action == "complete":
        if not args.series_instance_uid:
            raise UsageError("'series complete' needs a SeriesInstanceUID")
        return _complete(settings, args.series_instance_uid, as_json=args.json)
    if args.series_instance_uid:
        raise UsageError("'series list' takes no SeriesInstanceUID")
    rows = series_rows(settings)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(
        f"{'id':>5} {'ver':>3} {'state':<9} {'inst':>5} {'dup':>4} {'quar':>4} {'geom':>4} {'calling AE':<16} "
        "series_instance_uid"
    )
    for row in rows:
        findings = row["geometry_findings"]
        state = row["state"] + ("*" if row["superseded"] else "")
        print(
            f"{row['id']:>5} {row['version']:>3} {state:<9} {row['num_instances']:>5} {row['num_duplicates']:>4} "
            f"{row['num_quarantined']:>4} {'-' if findings is None else len(findings):>4} "
            f"{row['calling_ae_title']:<16} {row['series_instance_uid']}"
        )
    if any(row["superseded"] for row in rows):
        print("* superseded by a later version")
    return 0


def _complete(settings: Settings, series_instance_uid: str, *, as_json: bool) -> int:
    from service.celery_app import CeleryPublisher, make_celery_app
    from service.db.schema import open_database
    from service.ingest.assembly import force_complete
    from service.ingest.queue import queue_due_series
    from service.ingest.storage import InstanceStore

    with open_database(settings) as sessions:
        store = InstanceStore(
            storage_dir=settings.storage_dir,
            sessions=sessions,
            min_free_disk_bytes=0,
            max_disk_used_fraction=1.0,
        )
        series_id = force_complete(store=store, series_instance_uid=series_instance_uid)
        queued = False
        if series_id is not None:
            # Queue now if the broker answers; otherwise the listener's sweeper will. A running
            # listener may queue it first: then wait for the outcome of its publication.
            publisher = CeleryPublisher(make_celery_app(settings), settings)
            published = queue_due_series(
                sessions=store.sessions, publisher=publisher, resend_after_s=settings.queue_resend_after_s
            )
            queued = series_id in published or _queued_by_another(store.sessions, series_id)
    result = {
        "series_instance_uid": series_instance_uid,
        "completed_series_id": series_id,
        "queued": queued,
    }
    if as_json:
        print(json.dumps(result))
    elif series_id is None:
        print(f"no receiving version of series {series_instance_uid}")
    else:
        print(f"series {series_instance_uid} completed (id {series_id}){', queued' if result['queued'] else ''}")
    return 0 if series_id is not None else 1


def _queued_by_another(sessions: sessionmaker[Session], series_id: int, timeout_s: float = 60.0) -> bool:
    """Whether another process (a running listener) handed series version `series_id` to the pipeline.

    Its claim (`queue_attempts` > 0 while still `complete`) means it is publishing right now: wait
    for the outcome — `queued` or later, or the claim given back when the broker refused.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        with sessions() as session:
            state, attempts = session.execute(
                select(Series.state, Series.queue_attempts).where(Series.id == series_id)
            ).one()
        if state != SeriesState.COMPLETE:
            return True
        if attempts == 0 or time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def run_worker(args: argparse.Namespace) -> int:
    """Run a Celery worker, one task at a time (late acks, prefetch 1), on the chosen queues until stopped.

    Models are loaded once per process, on the first task that needs them.
    """
    settings = load_settings_or_exit()
    _check_metrics_port(args.metrics_port)
    use_metrics_dir(settings)  # before the imports below load prometheus_client
    from celery.utils.nodenames import host_format

    from service.celery_app import make_celery_app, queue_names
    from service.db.schema import require_database
    from service.metrics import serve_metrics
    from service.pipeline.tasks import register_pipeline_tasks

    logical = [name.strip() for name in args.queues.split(",") if name.strip()]
    try:
        queues = queue_names(settings, logical)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    node_name = host_format(args.hostname or f"gatekeeper-{'-'.join(logical)}-{os.getpid()}@%h")
    if "@" not in node_name or node_name.startswith("@") or node_name.endswith("@"):
        raise UsageError(f"--hostname must look like NAME@HOST, got {node_name!r}")
    sessions = require_database(settings)
    app = make_celery_app(settings)
    register_pipeline_tasks(app, settings=settings, sessions=sessions, worker_name=node_name)
    log.info("worker on queues %s", ", ".join(f"{n} ({q})" for n, q in zip(logical, queues, strict=True)))
    if args.metrics_port is not None:
        try:
            serve_metrics(settings, sessions, port=args.metrics_port)  # a daemon thread; ends with the worker
        except OSError as exc:
            raise UsageError(
                f"cannot serve metrics on {settings.metrics_bind_address}:{args.metrics_port}: {exc}"
            ) from exc
    app.worker_main(
        [
            "worker",
            "--pool=solo",
            "--concurrency=1",
            "--loglevel=INFO",
            "-Q",
            ",".join(queues),
            "-n",
            node_name,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            # Task events (name, id, the ids in args, state, runtime) are what Flower shows; without them,
            # and with gossip and heartbeats off, Flower's enable_events request could not turn them on.
            "--task-events",
        ]
    )
    return 0
