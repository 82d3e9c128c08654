"""`gatekeeper users ...`, `gatekeeper web` and `gatekeeper flower`: the worklist and its operation.

- `gatekeeper users add NAME --role dosimetrist|admin --password-stdin` (also `list`, `disable`,
  `enable`, `passwd`): the people who may log in to the worklist; passwords are stored hashed.
- `gatekeeper web [--host H] [--port P]`: the worklist app alone under uvicorn.
- `gatekeeper flower [--host H] [--port P]`: Flower, the Celery monitor, on the pipeline's broker,
  behind HTTP basic auth (`GATEKEEPER_FLOWER_USER` / `GATEKEEPER_FLOWER_PASSWORD`; refuses to start
  without them).

Heavy imports (FastAPI, uvicorn, Flower) happen inside the commands, so `gatekeeper --help` stays fast.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import sys

from service.db.schema import check_database, open_database
from service.db.tables import UserRole
from service.errors import UsageError
from service.settings import load_settings_or_exit

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `users`, `web` and `flower` to the top-level parser."""
    users = subparsers.add_parser("users", help="add, list and disable the users of the worklist")
    commands = users.add_subparsers(dest="users_command", metavar="USERS_COMMAND", required=True)

    add = commands.add_parser("add", help="add a user who may log in to the worklist")
    add.add_argument("name", help="login name (no spaces)")
    add.add_argument(
        "--role",
        required=True,
        choices=[r.value for r in UserRole],
        help="dosimetrist: works the worklist; admin: may also release or finish others' items",
    )
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input (else: prompt twice)",
    )
    add.set_defaults(func=run_add)

    passwd = commands.add_parser("passwd", help="set a user's password")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    passwd.set_defaults(func=run_passwd)

    listing = commands.add_parser("list", help="list the users: name, role, active")
    listing.set_defaults(func=run_list)

    disable = commands.add_parser("disable", help="stop a user from logging in (ends their sessions)")
    disable.add_argument("name")
    disable.set_defaults(func=run_set_active, active=False)

    enable = commands.add_parser("enable", help="let a disabled user log in again")
    enable.add_argument("name")
    enable.set_defaults(func=run_set_active, active=True)

    web = subparsers.add_parser("web", help="run the worklist web app (uvicorn)")
    web.add_argument("--host", default=None, help="IP address to bind (default: GATEKEEPER_WEB_BIND_ADDRESS)")
    web.add_argument("--port", type=int, default=None, help="TCP port (default: GATEKEEPER_WEB_PORT)")
    web.set_defaults(func=run_web)

    flower = subparsers.add_parser("flower", help="run Flower, the Celery monitor, with basic auth")
    flower.add_argument("--host", default=None, help="IP address to bind (default: GATEKEEPER_FLOWER_BIND_ADDRESS)")
    flower.add_argument("--port", type=int, default=None, help="TCP port (default: GATEKEEPER_FLOWER_PORT)")
    flower.set_defaults(func=run_flower)


# --- users -------------------------------------------------------------------------------------------


def read_password(args: argparse.Namespace) -> str:
    """The new password: the first line of stdin with --password-stdin, else typed twice at a terminal.

    Raises:
        UsageError: no password given, or the two typed ones differ.
    """
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != password:
            raise UsageError("the two passwords differ")
    else:
        raise UsageError("no terminal to ask for the password; pass --password-stdin and pipe it in")
    if not password:
        raise UsageError("empty password")
    return password


def run_add(args: argparse.Namespace) -> int:
    from service.web import crud

    settings = load_settings_or_exit()
    password = read_password(args)
    with open_database(settings) as sessions, sessions() as session:
        try:
            crud.create_user(session=session, name=args.name, role=args.role, password=password)
        except (ValueError, crud.Conflict) as exc:
            raise UsageError(str(exc)) from None
    print(f"user {args.name} added ({args.role})")
    return 0


def run_passwd(args: argparse.Namespace) -> int:
    from service.web import crud

    settings = load_settings_or_exit()
    password = read_password(args)
    with open_database(settings) as sessions, sessions() as session:
        try:
            crud.set_password(session=session, name=args.name, password=password)
        except (ValueError, crud.NotFound) as exc:
            raise UsageError(str(exc)) from None
    print(f"password of {args.name} changed")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from service.web import crud

    with open_database(load_settings_or_exit()) as sessions, sessions() as session:
        users = crud.list_users(session=session)
    print(f"{'NAME':<24} {'ROLE':<12} {'ACTIVE':<7} CREATED")
    for user in users:
        print(
            f"{user.name:<24} {user.role:<12} {'yes' if user.active else 'no':<7} "
            f"{user.created_at.isoformat(timespec='seconds')}"
        )
    return 0


def run_set_active(args: argparse.Namespace) -> int:
    from service.web import crud

    with open_database(load_settings_or_exit()) as sessions, sessions() as session:
        try:
            crud.set_user_active(session=session, name=args.name, active=args.active)
        except crud.NotFound as exc:
            raise UsageError(str(exc)) from None
    print(f"user {args.name} {'enabled' if args.active else 'disabled'}")
    return 0


# --- web and flower ------------------------------------------------------------------------------------


def run_web(args: argparse.Namespace) -> int:
    """Serve the worklist until interrupted."""
    import uvicorn

    from service.web.app import create_app
    from service.web.security import InsecureSettings

    settings = load_settings_or_exit()
    check_database(settings)  # unreachable or un-migrated: one line naming the fix, exit 2
    if args.host:  # the Host allow-list's default follows the address actually bound
        settings = settings.model_copy(update={"web_bind_address": args.host})
    try:
        app = create_app(settings)
    except InsecureSettings as exc:
        raise UsageError(str(exc)) from None
    host = args.host or settings.web_bind_address
    port = args.port or settings.web_port
    log.info("worklist on http://%s:%s", host, port)
    # Access log off: URLs hold Series Instance UIDs. log_config None keeps our logging set-up.
    # X-Forwarded-* only from the reverse proxy named in the settings (docs/security.md).
    proxies = settings.web_proxy_addresses
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies or None,
    )
    return 0


def run_flower(args: argparse.Namespace) -> int:
    """Serve Flower on the pipeline's broker, behind basic auth, until interrupted.

    Raises:
        UsageError: GATEKEEPER_FLOWER_USER or GATEKEEPER_FLOWER_PASSWORD is empty.
    """
    settings = load_settings_or_exit()
    user, password = settings.flower_user, settings.flower_password.get_secret_value()
    if not user or not password or ":" in user:
        raise UsageError(
            "Flower needs basic auth: set GATEKEEPER_FLOWER_USER (no colon) and GATEKEEPER_FLOWER_PASSWORD"
        )
    from flower.app import Flower
    from flower.options import options
    from flower.urls import settings as flower_settings

    from service.celery_app import make_celery_app

    options.address = args.host or settings.flower_bind_address
    options.port = args.port or settings.flower_port
    options.basic_auth = [f"{user}:{password}"]  # in memory only: not on the command line, not in `ps`
    options.purge_offline_workers = 3600
    flower_app = Flower(capp=make_celery_app(settings), options=options, **flower_settings)
    port = flower_app.start_http_server()
    log.info("Flower on http://%s:%s (basic auth)", options.address, port)
    try:
        flower_app.start()
    except KeyboardInterrupt:
        pass
    finally:
        flower_app.stop()
    return 0
