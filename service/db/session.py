"""Database engines and session factories, built once per process and passed to whoever needs them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker


def normalize_database_url(url: str | URL) -> URL:
    """Return `url` with `postgresql://` and `postgres://` mapped to the psycopg 3 driver.

    Raises:
        sqlalchemy.exc.ArgumentError: `url` is not a database URL.
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """Create the engine for `url` (SQLite or PostgreSQL); keyword arguments go to `create_engine`.

    SQLite connections enforce foreign keys and use write-ahead logging, so that readers do not
    block the listener's writes; the folder of a SQLite file is created if missing.
    PostgreSQL URLs use psycopg 3 whatever driver they name.
    """
    parsed = normalize_database_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True, **kwargs)

    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, **kwargs)

    @event.listens_for(engine, "connect")
    def _configure_sqlite(dbapi_connection: Any, connection_record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Return a factory of ORM sessions on `engine`; objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def rows_changed(result: Result[Any]) -> int:
    """How many rows an UPDATE or DELETE matched.

    `Session.execute` is typed as returning a plain `Result`; for DML it is a `CursorResult`.
    """
    return int(cast(CursorResult[Any], result).rowcount)
