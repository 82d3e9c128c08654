"""A database that is empty, behind or unreachable: every command that uses it says so in one line, exit code 2.

Each command runs as its own process (`gatekeeper ...`), as an operator would run it, with only
`GATEKEEPER_DATABASE_URL` (and a storage folder) set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from conftest import free_port
from sqlalchemy.engine import make_url

from service.db.schema import alembic_config

GATEKEEPER = str(Path(sys.executable).parent / "gatekeeper")
UNREACHABLE_URL = "postgresql://user:secret@127.0.0.1:1/x"  # port 1: nothing listens there
# Commands that need the database, with the arguments that get them past their own checks.
DATABASE_COMMANDS = [
    ["series"],
    ["series", "complete", "1.2.3"],
    ["exports", "list"],
    ["worker", "--queues", "score"],
    ["listen", "--allow-ae", "CT1", "--allow-ip", "127.0.0.0/8", "--port", str(free_port())],
    ["users", "list"],
    ["web", "--port", str(free_port())],
    ["feedback", "list"],
    ["contours", "list"],
    ["pool", "list", "--json"],
    ["status"],
]


def run_gatekeeper(args: list[str], *, database_url: str, storage: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEKEEPER_")}
    env |= {"GATEKEEPER_DATABASE_URL": database_url, "GATEKEEPER_STORAGE_DIR": str(storage)}
    return subprocess.run([GATEKEEPER, *args], env=env, capture_output=True, text=True, timeout=120)


def assert_one_line(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "secret" not in result.stderr + result.stdout
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("args", DATABASE_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_an_empty_sqlite_database_asks_for_db_upgrade(tmp_path: Path, args: list[str]) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    line = assert_one_line(run_gatekeeper(args, database_url=url, storage=tmp_path), "run `gatekeeper db upgrade`")
    assert line == (
        f"gatekeeper: the database at {url} has no gatekeeper tables (or is behind); run `gatekeeper db upgrade`"
    )


@pytest.mark.integration
def test_an_empty_postgres_database_asks_for_db_upgrade(tmp_path: Path, postgres_db_url: str) -> None:
    masked = make_url(postgres_db_url).render_as_string(hide_password=True)
    for args in (["series"], ["exports", "list"]):
        line = assert_one_line(run_gatekeeper(args, database_url=postgres_db_url, storage=tmp_path), masked)
        assert line.endswith("has no gatekeeper tables (or is behind); run `gatekeeper db upgrade`")


@pytest.mark.integration
def test_a_postgres_database_one_revision_behind_asks_for_db_upgrade(tmp_path: Path, postgres_db_url: str) -> None:
    command.upgrade(alembic_config(postgres_db_url), "head")
    command.downgrade(alembic_config(postgres_db_url), "-1")
    assert_one_line(run_gatekeeper(["series"], database_url=postgres_db_url, storage=tmp_path), "(or is behind)")
    command.upgrade(alembic_config(postgres_db_url), "head")
    listed = run_gatekeeper(["series"], database_url=postgres_db_url, storage=tmp_path)
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr


@pytest.mark.parametrize("args", [*DATABASE_COMMANDS, ["db", "upgrade"]], ids=lambda a: " ".join(a[:2]))
def test_an_unreachable_database_is_named_with_its_password_masked(tmp_path: Path, args: list[str]) -> None:
    assert_one_line(
        run_gatekeeper(args, database_url=UNREACHABLE_URL, storage=tmp_path),
        "gatekeeper: cannot connect to the database at postgresql://user:***@127.0.0.1:1/x",
    )


@pytest.mark.integration
def test_serve_refuses_an_empty_postgres_database_and_migrates_its_own_sqlite(
    tmp_path: Path, postgres_db_url: str
) -> None:
    """serve migrates only the embedded SQLite database; PostgreSQL must be migrated before it starts any child."""
    serve = ["serve", "--port", str(free_port()), "--no-web", "--allow-ae", "CT1", "--allow-ip", "127.0.0.0/8"]
    result = run_gatekeeper(serve, database_url=postgres_db_url, storage=tmp_path)
    assert_one_line(result, "has no gatekeeper tables (or is behind); run `gatekeeper db upgrade`")

    from service.commands.serve import migrate_sqlite
    from service.settings import Settings

    settings = Settings(storage_dir=tmp_path / "var")  # the default: SQLite under storage_dir
    migrate_sqlite(settings)  # what serve does first
    listed = run_gatekeeper(["series"], database_url=settings.database_url, storage=tmp_path / "var")
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
