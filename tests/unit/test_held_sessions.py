"""The replay's sessions on held connections (``service.db.HeldSession``): a transaction
that uses no ORM object runs on the connection alone, and commits, rolls back and
writes its audit rows as any session's transaction does."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from service import tenants
from service.db import (
    _HOLDS_WRITER,
    MEMORY_URL,
    close_held,
    held_session_factories,
    make_engine,
    session_scope,
    transaction_connection,
)
from service.migrate import upgrade
from service.models import Event, Tenant
from service.states import record

NOW = datetime(2026, 1, 5, tzinfo=UTC)


Held = tuple[sessionmaker[Session], sessionmaker[Session]]


@pytest.fixture
def held() -> Iterator[Held]:
    engine = make_engine(MEMORY_URL)
    upgrade(engine)
    write, read = held_session_factories(engine)
    yield write, read
    close_held(write, read)
    engine.dispose()


def _count(read: sessionmaker[Session], table: type) -> int:
    with session_scope(read) as session:
        return int(session.execute(select(func.count()).select_from(table)).scalar_one())


def _tenant_names(read: sessionmaker[Session]) -> list[str]:
    with session_scope(read) as session:
        return list(session.execute(select(Tenant.name)).scalars().all())  # type: ignore[call-overload]


def test_a_core_transaction_commits_its_audit_rows_and_the_session_is_reused(held: Held) -> None:
    write, read = held
    with session_scope(write) as session:
        first = session
        record(session, "pool", "p", "noted", NOW, pool="p")
        transaction_connection(session)
        assert session.get_transaction() is None  # the ORM's transaction was not needed
    assert _count(read, Event) == 1
    with session_scope(write) as session:
        assert session is first and session.info == {}


def test_a_failed_core_transaction_rolls_back_and_drops_its_audit_rows(held: Held) -> None:
    write, read = held
    with pytest.raises(RuntimeError), session_scope(write) as session:
        tenants.create_many(session, ["a"], NOW)
        record(session, "pool", "p", "noted", NOW, pool="p")
        raise RuntimeError("the caller failed")
    assert (_count(read, Tenant), _count(read, Event)) == (0, 0)
    with session_scope(write) as session:  # nothing left over in the reused session
        transaction_connection(session)
    assert _count(read, Event) == 0


def test_orm_work_joins_the_core_transaction_and_commits_or_rolls_back_with_it(held: Held) -> None:
    write, read = held
    with session_scope(write) as session:
        tenants.create_many(session, ["a"], NOW)
        assert session.execute(select(Tenant)).scalars().one().name == "a"  # ORM, joined
        tenants.create_many(session, ["b"], NOW)
    assert _count(read, Tenant) == 2
    with pytest.raises(RuntimeError), session_scope(write) as session:
        tenants.create_many(session, ["c"], NOW)
        session.execute(select(Tenant)).all()
        raise RuntimeError("the caller failed")
    assert _count(read, Tenant) == 2


def test_a_rollback_inside_the_scope_starts_a_new_transaction(held: Held) -> None:
    write, read = held
    with session_scope(write) as session:
        tenants.create_many(session, ["a"], NOW)
        session.rollback()  # as acquire after losing the unique index to another request
        tenants.create_many(session, ["b"], NOW)
        assert transaction_connection(session).connection.driver_connection.in_transaction
    assert _tenant_names(read) == ["b"]


def test_a_core_statement_takes_over_the_transaction_begun_on_the_driver(held: Held) -> None:
    write, read = held
    with session_scope(write) as session:
        tenants.create_many(session, ["a"], NOW)  # begun on the driver connection
        connection = transaction_connection(session)
        assert not connection.in_transaction()  # SQLAlchemy was not told
        connection.execute(text("UPDATE tenants SET name = 'b'"))  # autobegins: takes over
        assert connection.in_transaction()
    assert _HOLDS_WRITER not in connection.info  # the write lock was let go
    with pytest.raises(RuntimeError), session_scope(write) as session:
        tenants.create_many(session, ["c"], NOW)
        transaction_connection(session).execute(text("UPDATE tenants SET name = 'd'"))
        raise RuntimeError("the caller failed")
    assert _HOLDS_WRITER not in connection.info
    assert _tenant_names(read) == ["b"]


def test_a_read_transaction_on_the_driver_takes_no_write_lock(held: Held) -> None:
    write, read = held
    with session_scope(read) as session:
        connection = transaction_connection(session)
        assert connection.connection.driver_connection.in_transaction
        assert _HOLDS_WRITER not in connection.info
    with session_scope(write) as session:
        tenants.create_many(session, ["a"], NOW)
    assert _count(read, Tenant) == 1
