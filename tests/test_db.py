"""Engine setup and table types: foreign keys on SQLite, UTC datetimes, psycopg 3 URLs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, StatementError

from service.db.session import make_engine, make_session_factory, normalize_database_url
from service.db.tables import Base, Instance, Series
from service.lifecycle import SeriesState


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'gatekeeper.db'}")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def make_series(received_at: dt.datetime) -> Series:
    return Series(
        series_instance_uid="1.2.3.4",
        version=1,
        study_instance_uid="1.2.3",
        modality="CT",
        calling_ae_title="CT1",
        state="receiving",
        first_received_at=received_at,
        last_received_at=received_at,
    )


def test_postgresql_urls_use_psycopg_3() -> None:
    assert normalize_database_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_database_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_database_url("sqlite:///x.db").drivername == "sqlite"


def test_sqlite_datetimes_come_back_as_utc(sqlite_engine: Engine) -> None:
    sessions = make_session_factory(sqlite_engine)
    received_at = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with sessions() as session:
        session.add(make_series(received_at))
        session.commit()
    with sessions() as session:
        series = session.query(Series).one()
    assert series.first_received_at == received_at
    assert series.first_received_at.tzinfo == dt.UTC
    assert series.state == SeriesState.RECEIVING
    assert series.num_instances == 0 and series.superseded is False


def test_naive_datetime_is_refused(sqlite_engine: Engine) -> None:
    with make_session_factory(sqlite_engine)() as session:
        session.add(make_series(dt.datetime(2026, 1, 2)))
        with pytest.raises(StatementError, match="no time zone"):
            session.commit()


def test_sqlite_enforces_foreign_keys(sqlite_engine: Engine) -> None:
    now = dt.datetime.now(dt.UTC)
    instance = Instance(
        series_id=999,
        sop_instance_uid="1.2.3.4.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        relative_path="a/b.dcm",
        sha256="0" * 64,
        size_bytes=1,
        received_at=now,
    )
    with make_session_factory(sqlite_engine)() as session:
        session.add(instance)
        with pytest.raises(IntegrityError):
            session.commit()
