"""Is the database there, and at the newest schema? The check every command that uses it runs first.

A command that needs the database calls `require_database(settings)` (a long-running process),
`open_database(settings)` (a command that ends) or `check_database(settings)` (a process whose
engines are built elsewhere, such as the listener's): an unreachable database, or one without the
gatekeeper's tables at the newest Alembic revision, ends the command with one line and exit code 2
(`DatabaseNotReady`) instead of a traceback from the first query. Migrating is `gatekeeper db
upgrade` (`service.commands.db`), with the configuration `alembic_config` builds here; no alembic.ini.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

import migrations
from service.db.session import make_engine, make_session_factory
from service.errors import DatabaseNotReady
from service.settings import Settings

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent
#: Alembic's table of applied revisions (its default name; migrations/env.py keeps it).
VERSION_TABLE = "alembic_version"


def alembic_config(database_url: str) -> Config:
    """Return an Alembic configuration that migrates `database_url` with the revisions in `migrations/`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["sqlalchemy.url"] = database_url
    return config


def masked_url(url: str) -> str:
    """`url` with its password replaced by `***`, fit for a message or a log line."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<not a database URL>"


def unreachable(url: str, exc: DBAPIError) -> DatabaseNotReady:
    """The error for a database that does not answer: the URL tried (password masked) and the driver's reason.

    The reason is the first line of the driver's message, with the password masked should it appear.
    """
    reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
    password = make_url(url).password
    if password:
        reason = reason.replace(str(password), "***")
    return DatabaseNotReady(f"cannot connect to the database at {masked_url(url)}: {reason}")


def current_revisions(connection: Connection) -> set[str]:
    """The Alembic revisions the database is at: empty when it has no `alembic_version` table.

    Read directly rather than through Alembic's MigrationContext, which logs two lines at INFO.
    """
    if not inspect(connection).has_table(VERSION_TABLE):
        return set()
    return {str(rev) for rev in connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars()}


def check_schema(engine: Engine, url: str) -> None:
    """Connect through `engine` and compare the database's Alembic revision with the newest one in `migrations/`.

    Raises:
        DatabaseNotReady: the database does not answer (the message names `url`, password masked);
            it has no gatekeeper tables or an older revision (run `gatekeeper db upgrade`); or it is
            at a revision this version of the gatekeeper does not know (a newer release migrated it).
    """
    script = ScriptDirectory.from_config(alembic_config(url))
    heads = set(script.get_heads())
    try:
        with engine.connect() as connection:
            current = current_revisions(connection)
    except DBAPIError as exc:
        raise unreachable(url, exc) from None
    if current == heads:
        return
    unknown = sorted(rev for rev in current if rev not in {s.revision for s in script.walk_revisions()})
    if unknown:
        raise DatabaseNotReady(
            f"the database at {masked_url(url)} is at revision {', '.join(unknown)}, which this version of "
            "the gatekeeper does not know (migrated by a newer release?)"
        )
    raise DatabaseNotReady(
        f"the database at {masked_url(url)} has no gatekeeper tables (or is behind); run `gatekeeper db upgrade`"
    )


def require_reachable(url: str) -> None:
    """Open one connection to `url` and close it (before an Alembic command, whose errors are not one line).

    Raises:
        DatabaseNotReady: the database does not answer (the message names `url`, password masked).
    """
    engine = make_engine(url)
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        raise unreachable(url, exc) from None
    finally:
        engine.dispose()


def require_database(settings: Settings) -> sessionmaker[Session]:
    """The session factory of `settings.database_url`, after checking that the database is ready.

    The engine is built once, here; the caller owns it for the life of the process (it is
    `sessions.kw["bind"]`; `open_database` disposes of it for commands that end).

    Raises:
        DatabaseNotReady: see `check_schema`.
    """
    engine = make_engine(settings.database_url)
    try:
        check_schema(engine, settings.database_url)
    except DatabaseNotReady:
        engine.dispose()
        raise
    return make_session_factory(engine)


def check_database(settings: Settings) -> None:
    """Check that the database of `settings` is ready, for a process that builds its own engines later.

    Raises:
        DatabaseNotReady: see `check_schema`.
    """
    with open_database(settings):
        pass


@contextmanager
def open_database(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """`require_database` for a command that ends: the engine is disposed of on leaving the block.

    Raises:
        DatabaseNotReady: see `check_schema`.
    """
    sessions = require_database(settings)
    try:
        yield sessions
    finally:
        sessions.kw["bind"].dispose()
