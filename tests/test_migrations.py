"""Migrations: `upgrade head` on an empty database matches the tables exactly, and undoes cleanly."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from service.commands import db as db_cli
from service.commands.main import UsageError
from service.db.session import make_engine
from service.db.tables import Base
from service.settings import get_settings


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty database of each supported kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gatekeeper.db'}"
    return str(request.getfixturevalue("postgres_db_url"))


@pytest.fixture
def settings_database(monkeypatch: pytest.MonkeyPatch, empty_database_url: str) -> Iterator[str]:
    """Point the settings (and so `gatekeeper db`) at the empty database."""
    monkeypatch.setenv("GATEKEEPER_DATABASE_URL", empty_database_url)
    get_settings.cache_clear()
    yield empty_database_url
    get_settings.cache_clear()


def schema_differences(url: str) -> list[object]:
    """What Alembic autogenerate would change to make the database at `url` match the tables."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_head_on_empty_database_matches_tables(empty_database_url: str) -> None:
    config = db_cli.alembic_config(empty_database_url)
    command.upgrade(config, "head")
    assert schema_differences(empty_database_url) == []
    assert table_names(empty_database_url) == {
        "alembic_version",
        "series",
        "instance",
        "series_event",
        "quarantined_instance",
        "export",
        "export_attempt",
        "series_score",
        "app_user",
        "worklist_item",
        "contour_feedback",
        "audit_event",
        "contour_object",
        "pool_entry",
        "model_version",
        "model_event",
    }


def test_downgrade_to_base_removes_every_table(empty_database_url: str) -> None:
    config = db_cli.alembic_config(empty_database_url)
    command.upgrade(config, "head")
    command.downgrade(config, "base")
    assert table_names(empty_database_url) == {"alembic_version"}


def test_db_check_fails_before_upgrade_and_passes_after(settings_database: str) -> None:
    assert db_cli.run_check(argparse.Namespace()) == 1
    assert db_cli.run_upgrade(argparse.Namespace(revision="head")) == 0
    assert db_cli.run_check(argparse.Namespace()) == 0


def test_db_upgrade_to_unknown_revision_is_a_usage_error(settings_database: str) -> None:
    with pytest.raises(UsageError, match="no_such_revision"):
        db_cli.run_upgrade(argparse.Namespace(revision="no_such_revision"))
