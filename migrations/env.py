"""Alembic environment: runs the revisions under `versions/` against one database.

The URL is not configured in a file: `service.commands.db.alembic_config` puts it into
`config.attributes["sqlalchemy.url"]`.
"""

from __future__ import annotations

from alembic import context

from service.db.session import make_engine
from service.db.tables import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    """The URL to migrate, as set by the caller.

    Raises:
        RuntimeError: the caller set no URL.
    """
    url = config.attributes.get("sqlalchemy.url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError('no database URL: set config.attributes["sqlalchemy.url"]')
    return str(url)


def run_migrations_offline() -> None:
    """Write the SQL of the migrations to stdout instead of running them (`alembic --sql`)."""
    url = database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on a live connection."""
    engine = make_engine(database_url())
    try:
        with engine.connect() as connection:
            is_sqlite = connection.dialect.name == "sqlite"
            if is_sqlite:
                # Batch migrations copy and drop tables; with foreign keys enforced a drop could
                # cascade into the rows of other tables. The pragma must be set outside a transaction.
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                connection.commit()
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=is_sqlite,
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
