"""`gatekeeper serve`: the whole gatekeeper on one machine — listener, pipeline worker and worklist web app.

    gatekeeper serve [listener flags of `gatekeeper listen`] [--web-port P] [--queues ...]

Each part runs as its own child process with exactly the commands production runs
(`gatekeeper listen`, `gatekeeper worker`, `gatekeeper web`); only the URLs differ.
With no configuration the database is SQLite and the Celery broker kombu's SQLAlchemy transport on
SQLite (`sqla+sqlite://`), both under `storage_dir`, so nothing else needs to run; the database is
migrated on start. With `GATEKEEPER_DATABASE_URL` and `GATEKEEPER_BROKER_URL` pointing at
PostgreSQL and Redis it is the production setup (migrate those with `gatekeeper db upgrade`; serve
refuses to start, in one line, while that database does not answer or is not migrated).

Without allow-lists, and only while the listener binds a loopback address, serve accepts any
calling AE title from the loopback network (a single-machine trial); anything else must be
configured, as for `gatekeeper listen`. SIGINT/SIGTERM stop every child (SIGTERM, then SIGKILL
after `STOP_TIMEOUT_S`); if one child dies, the others are stopped and serve exits 1.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from alembic import command as alembic_command
from alembic.util.exc import CommandError

from service.db.schema import alembic_config, check_database, masked_url
from service.errors import DatabaseNotReady, UsageError
from service.settings import Settings, settings_environment

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0
LOOPBACK_NETWORKS = ["127.0.0.0/8", "::1/128"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `gatekeeper serve` to the top-level parser."""
    serve = subparsers.add_parser("serve", help="run listener, pipeline worker and worklist on one machine")
    serve.add_argument("--ae-title", help="our AE title (setting ae_title)")
    serve.add_argument("--bind", help="IP address to listen on (setting bind_address)")
    serve.add_argument("--port", type=int, help="DICOM TCP port (setting port)")
    serve.add_argument(
        "--allow-ae",
        action="append",
        metavar="TITLE",
        help="calling AE title allowed to send; repeatable; '*' for any (setting allowed_ae_titles)",
    )
    serve.add_argument(
        "--allow-ip",
        action="append",
        metavar="CIDR",
        help="network allowed to send; repeatable (setting allowed_networks)",
    )
    serve.add_argument("--web-port", type=int, help="TCP port of the worklist web app (setting web_port)")
    serve.add_argument(
        "--queues",
        default="score,segment,export,default",
        help="queues of the embedded worker (default all; see `gatekeeper worker`)",
    )
    serve.add_argument("--no-web", action="store_true", help="do not start the web app")
    serve.set_defaults(func=run)


def serve_settings(args: argparse.Namespace) -> Settings:
    """The settings with the flags applied and, on a loopback bind without allow-lists, loopback access.

    Raises:
        UsageError: a flag value is invalid, or the allow-lists are empty on a non-loopback bind.
    """
    from service.commands.ingest import LISTENER_FLAGS, settings_values, validated_settings

    values = settings_values(args, (*LISTENER_FLAGS, ("web_port", "web_port")))
    try:
        loopback = ipaddress.ip_address(values["bind_address"]).is_loopback
    except ValueError:
        loopback = False
    if loopback and not values["allowed_networks"] and not values["allowed_ae_titles"]:
        values["allowed_networks"], values["allowed_ae_titles"] = LOOPBACK_NETWORKS, ["*"]
        log.warning("no allow-lists configured: accepting any calling AE title from this machine only")
    settings = validated_settings(values)
    if not settings.allowed_ae_titles or not settings.allowed_networks:
        raise UsageError(
            "the listener needs allow-lists: use --allow-ae TITLE and --allow-ip CIDR "
            "(or GATEKEEPER_ALLOWED_AE_TITLES / GATEKEEPER_ALLOWED_NETWORKS)"
        )
    return settings


def migrate_sqlite(settings: Settings) -> None:
    """Bring an SQLite database to the newest schema (`gatekeeper db upgrade`); others are migrated by ops.

    Raises:
        DatabaseNotReady: Alembic cannot migrate it (e.g. it is at a revision this release does not know).
    """
    if not settings.database_url.startswith("sqlite"):
        return
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    try:
        alembic_command.upgrade(alembic_config(settings.database_url), "head")
    except CommandError as exc:
        raise DatabaseNotReady(f"cannot migrate the database at {masked_url(settings.database_url)}: {exc}") from None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphan keeps a port if serve is killed
    except OSError:
        pass


def web_available() -> bool:
    """True when the worklist web app (`gatekeeper web`: `service.web.app`, uvicorn) can be imported."""
    try:
        import uvicorn  # noqa: F401

        from service.web.app import create_app  # noqa: F401
    except ImportError as exc:
        log.warning("worklist web app not started: %s", exc)
        return False
    return True


def child_commands(settings: Settings, *, queues: str, web: bool) -> dict[str, list[str]]:
    """The command line of each child process, by name."""
    gatekeeper = [sys.executable, "-m", "service.commands.main"]
    commands = {
        "listener": [*gatekeeper, "listen"],
        "worker": [*gatekeeper, "worker", "--queues", queues],
    }
    if web:
        commands["web"] = [*gatekeeper, "web"]
    return commands


def run(args: argparse.Namespace) -> int:
    """Start the children, wait for a signal or for one of them to end, stop them all."""
    settings = serve_settings(args)
    migrate_sqlite(settings)
    # PostgreSQL is migrated by ops: one line now rather than every child failing on its first query.
    check_database(settings)
    clear_metrics_files(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEKEEPER_")} | settings_environment(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    children: dict[str, subprocess.Popen[bytes]] = {}
    for name, command in child_commands(settings, queues=args.queues, web=not args.no_web and web_available()).items():
        children[name] = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)
        log.info("started %s (pid %s)", name, children[name].pid)
    log.info(
        "gatekeeper serving: DICOM %s:%s as %s; database %s; broker %s%s",
        settings.bind_address,
        settings.port,
        settings.ae_title,
        settings.database_url.split("://")[0],
        settings.broker_url.split("://")[0],
        f"; worklist http://{settings.bind_address}:{settings.web_port}/" if "web" in children else "",
    )
    failed = None
    while not stop.wait(0.5):
        failed = next((name for name, child in children.items() if child.poll() is not None), None)
        if failed:
            log.error("%s ended with exit code %s; stopping the others", failed, children[failed].returncode)
            break
    stop_children(children)
    return 1 if failed else 0


def clear_metrics_files(settings: Settings) -> None:
    """Remove the event-metric files of earlier runs (serve owns every process that writes them).

    The counters start again from zero, as after any restart; without this, files of dead processes
    would pile up in `metrics_dir`.
    """
    if settings.metrics_dir is not None and settings.metrics_dir.is_dir():
        for path in settings.metrics_dir.glob("*.db"):
            path.unlink(missing_ok=True)


def stop_children(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM every running child, wait up to `STOP_TIMEOUT_S`, then SIGKILL what is left."""
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for name, child in children.items():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", name, STOP_TIMEOUT_S)
            child.kill()
            child.wait()
    log.info("stopped")
