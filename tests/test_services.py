"""The service fixtures of conftest.py give working PostgreSQL and Redis servers."""

from __future__ import annotations

import uuid

import psycopg
import pytest
import redis

pytestmark = pytest.mark.integration


def test_redis_fixture_answers_ping(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert client.ping()
    key = f"gatekeeper-test-{uuid.uuid4().hex}"
    client.set(key, "1", ex=10)
    assert client.get(key) == b"1"
    client.delete(key)


def test_postgres_fixture_gives_an_empty_database_per_test(postgres_db_url: str) -> None:
    with psycopg.connect(postgres_db_url) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
    assert name is not None and name[0].startswith("gatekeeper_test_")
    assert tables == (0,)
