"""Shared fixtures: real PostgreSQL and Redis servers for integration tests.

The servers already running on 127.0.0.1 (5432 for PostgreSQL, 6379 for Redis) are used when they
answer, as on CI and the development machines. Otherwise throwaway servers are started from the
installed binaries for this test session and stopped at its end. Tests are never skipped for want
of a server: a missing binary fails the test with a message saying what to install.

Fixtures:
- `postgres_url` (session): URL of the server's `postgres` database, for admin statements only.
- `postgres_db_url` (function): URL of a new, empty database, dropped after the test.
- `redis_url` (session): `redis://127.0.0.1:PORT/0` of a running Redis server.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy.engine import make_url

LOCAL_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
STARTUP_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_answers(url: str) -> bool:
    """True if a PostgreSQL server at `url` accepts a connection within 2 seconds."""
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def redis_answers(url: str) -> bool:
    """True if a Redis server at `url` answers PING within 1 second."""
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def find_postgres_bin() -> Path:
    """The folder with the newest installed `initdb` and `pg_ctl`.

    Raises:
        RuntimeError: no PostgreSQL server binaries are installed.
    """
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("no PostgreSQL at 127.0.0.1:5432 and no initdb installed (apt-get install postgresql)")


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Run a fresh PostgreSQL server (trust auth, user postgres) on a free port; yield its admin URL.

    As root, the server runs as the `postgres` system user, because initdb refuses to run as root.
    """
    bindir = find_postgres_bin()
    workdir = Path(tempfile.mkdtemp(prefix="gatekeeper-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(workdir, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = workdir / "data", free_port()
    pg_ctl = [*as_user, str(bindir / "pg_ctl"), "-D", str(data)]
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*pg_ctl, "-o", options, "-l", str(workdir / "log"), "-w", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], check=False, capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def throwaway_redis() -> Iterator[str]:
    """Run a Redis server that keeps nothing on disk on a free port; yield its URL.

    Raises:
        RuntimeError: redis-server is not installed or does not answer in time.
    """
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("no Redis at 127.0.0.1:6379 and no redis-server installed (apt-get install redis-server)")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not redis_answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of the `postgres` database of a running PostgreSQL server (superuser, trust auth)."""
    if postgres_answers(LOCAL_POSTGRES_URL):
        yield LOCAL_POSTGRES_URL
        return
    with throwaway_postgres() as url:
        yield url


@pytest.fixture
def postgres_db_url(postgres_url: str) -> Iterator[str]:
    """URL of a new, empty PostgreSQL database of its own for this test; dropped afterwards."""
    name = f"gatekeeper_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of database 0 of a running Redis server; tests share it, so use unique key names."""
    if redis_answers(LOCAL_REDIS_URL):
        yield LOCAL_REDIS_URL
        return
    with throwaway_redis() as url:
        yield url


#: Fixtures that need a running server: a test that uses one is in the integration tier.
SERVER_FIXTURES = frozenset({"postgres_url", "postgres_db_url", "redis_url"})
#: Modules whose tests train or evaluate models, write phantom series or start `gatekeeper` processes
#: (seconds to minutes each): the slow tier, with the longest tests of the unmarked ones measured.
SLOW_MODULES = frozenset(
    {
        "test_cli_database",
        "test_detector_eval",
        "test_detector_eval_patch",
        "test_detector_training",
        "test_gate_eval",
        "test_phantom",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses a server fixture `integration` and every test of `SLOW_MODULES` `slow`, so
    that `make test-fast` (the unit tier, `-m "not integration and not slow"`) never waits on PostgreSQL,
    Redis, a training run or a child process."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if item.path.stem in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
