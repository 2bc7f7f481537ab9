"""``DriverStatement``: the same rows, types and errors as SQLAlchemy, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import DateTime, bindparam, exists, insert, select, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from service.driver_sql import DriverStatement
from service.models import (
    LIVE_TASK_STATES,
    Event,
    Lease,
    LeaseState,
    Task,
    Tenant,
    UTCDateTime,
    Worker,
)
from tests.support.fakes import ManualClock
from tests.unit.conftest import Tx, add_ready_worker, add_tenant

POOL = "hosted-ubuntu"
_W = Worker.__table__  # type: ignore[attr-defined]
_L = Lease.__table__  # type: ignore[attr-defined]
_T = Tenant.__table__  # type: ignore[attr-defined]
_TASKS = Task.__table__  # type: ignore[attr-defined]
_E = Event.__table__  # type: ignore[attr-defined]


def _ready_worker(tx: Tx, clock: ManualClock) -> str:
    with tx() as session:
        return add_ready_worker(session, POOL, clock.now()).id


def test_a_select_returns_what_sqlalchemy_returns_types_and_names_included(
    engine: Engine, tx: Tx, clock: ManualClock
) -> None:
    _ready_worker(tx, clock)
    clock.advance(seconds=1)
    _ready_worker(tx, clock)
    statement = (
        select(_W.c.id, _W.c.ready_at, _W.c.create_attempts, _W.c.provider_id)
        .where(_W.c.pool == bindparam("pool"), _W.c.state.in_(["ready", "leased"]))
        .order_by(_W.c.ready_at)
        .limit(5)
    )
    with engine.connect() as connection:
        expected = connection.execute(statement, {"pool": POOL}).all()
        rows = DriverStatement(statement).all(connection, {"pool": POOL})
        first = DriverStatement(statement).first(connection, {"pool": POOL})
    assert [tuple(row) for row in rows] == [tuple(row) for row in expected]
    assert len(rows) == 2
    assert rows[0].ready_at.tzinfo == UTC  # the column type's own result processing
    assert first is not None and first.id == expected[0].id
    with engine.connect() as connection:
        assert DriverStatement(statement).first(connection, {"pool": "none"}) is None


def test_an_update_returning_binds_datetimes_as_the_column_type_stores_them(
    engine: Engine, tx: Tx, clock: ManualClock
) -> None:
    worker_id = _ready_worker(tx, clock)
    later = clock.now() + timedelta(minutes=5)
    statement = DriverStatement(
        update(_W)
        .where(_W.c.id == bindparam("b_id"), _W.c.state == "ready")
        .values(state="leased", state_changed_at=bindparam("now"))
        .returning(_W.c.id, _W.c.state_changed_at)
    )
    with engine.begin() as connection:
        moved = statement.first(connection, {"b_id": worker_id, "now": later})
        again = statement.first(connection, {"b_id": worker_id, "now": later})
    assert moved is not None and (moved.id, moved.state_changed_at) == (worker_id, later)
    assert again is None  # the WHERE held it at ready
    with engine.connect() as connection:
        stored = connection.execute(
            select(_W.c.state, _W.c.state_changed_at).where(_W.c.id == worker_id)
        ).one()
    assert (stored.state, stored.state_changed_at) == ("leased", later)


def test_a_returning_with_an_in_list_subquery_expands_it(
    engine: Engine, tx: Tx, clock: ManualClock
) -> None:
    worker_id = _ready_worker(tx, clock)
    statement = DriverStatement(
        select(
            _W.c.id,
            exists()
            .where(_TASKS.c.worker_id == _W.c.id, _TASKS.c.state.in_(LIVE_TASK_STATES))
            .label("busy"),
        ).where(_W.c.id == bindparam("worker_id"))
    )
    with engine.connect() as connection:
        row = statement.first(connection, {"worker_id": worker_id})
    assert row is not None and row.id == worker_id and not row.busy


def test_a_unique_index_violation_is_sqlalchemys_integrity_error(
    engine: Engine, tx: Tx, clock: ManualClock
) -> None:
    tenant_id = add_tenant(tx, clock.now())
    worker_id = _ready_worker(tx, clock)
    names = ("id", "tenant_id", "pool", "state", "worker_id", "created_at", "activated_at")
    statement = DriverStatement(insert(_L).values({name: bindparam(name) for name in names}))
    now = clock.now()
    row = {
        "tenant_id": tenant_id,
        "pool": POOL,
        "state": LeaseState.ACTIVE,
        "worker_id": worker_id,
        "created_at": now,
        "activated_at": now,
    }
    with engine.begin() as connection:
        assert statement.run(connection, {"id": "l_first", **row}) == 1
    with pytest.raises(IntegrityError), engine.begin() as connection:
        statement.run(connection, {"id": "l_second", **row})  # same tenant, pool, worker
    with engine.connect() as connection:
        ids = connection.execute(select(_L.c.id)).scalars().all()
    assert ids == ["l_first"]  # the failed transaction rolled back, the first stands


def test_run_many_writes_every_row(engine: Engine, clock: ManualClock) -> None:
    columns = ("at", "kind", "subject_id", "reason")
    statement = DriverStatement(insert(_E).values({name: bindparam(name) for name in columns}))
    now = clock.now()
    rows = [{"at": now, "kind": "lease", "subject_id": f"l_{i}", "reason": "r"} for i in range(3)]
    with engine.begin() as connection:
        statement.run_many(connection, rows)
    with engine.connect() as connection:
        events = connection.execute(
            select(_E.c.subject_id, _E.c.at)
            .where(_E.c.subject_id.like("l\\_%", escape="\\"))
            .order_by(_E.c.subject_id)
        ).all()
    assert [(row.subject_id, row.at) for row in events] == [(f"l_{i}", now) for i in range(3)]


def test_a_naive_datetime_is_refused_before_the_database(engine: Engine) -> None:
    statement = DriverStatement(
        update(_T).where(_T.c.id == bindparam("b_id")).values(disabled_at=bindparam("at"))
    )
    with pytest.raises(ValueError, match="naive"), engine.begin() as connection:
        statement.run(connection, {"b_id": "t_x", "at": datetime(2026, 1, 1)})


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 1, 5, 3, 4, 5, tzinfo=UTC),
        datetime(2026, 1, 5, 3, 4, 5, 120, tzinfo=UTC),
        datetime(2026, 1, 5, 3, 4, 5, 999999, tzinfo=UTC),
        datetime(999, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime(2026, 1, 5, 1, 4, 5, 7, tzinfo=timezone(timedelta(hours=-2, minutes=-30))),
        datetime(2026, 1, 5, 1, 4, 5, tzinfo=ZoneInfo("Europe/Berlin")),
        None,
    ],
)
def test_utc_datetime_binds_on_sqlite_the_text_sqlalchemy_stores(moment: datetime | None) -> None:
    """``UTCDateTime``'s one-function bind on SQLite against SQLAlchemy's own two steps
    (``process_bind_param``, then SQLite's ``DATETIME`` text)."""
    dialect = sqlite.dialect()
    column = UTCDateTime()
    own = column.bind_processor(dialect)
    sqlalchemys = DateTime().dialect_impl(dialect).bind_processor(dialect)
    assert own is not None and sqlalchemys is not None
    assert own(moment) == sqlalchemys(column.process_bind_param(moment, dialect))
    with pytest.raises(ValueError, match="naive"):
        own(datetime(2026, 1, 5))


def test_the_last_bound_moment_is_reused_only_for_that_very_object() -> None:
    """The bind's one-entry memo: the same object gives the same text; an equal moment
    in another zone, or another moment, is written afresh."""
    bind = UTCDateTime().bind_processor(sqlite.dialect())
    assert bind is not None
    moment = datetime(2026, 1, 5, 3, 4, 5, tzinfo=UTC)
    assert bind(moment) == bind(moment) == "2026-01-05 03:04:05.000000"
    berlin = moment.astimezone(ZoneInfo("Europe/Berlin"))
    assert bind(berlin) == "2026-01-05 03:04:05.000000"
    assert bind(moment + timedelta(microseconds=7)) == "2026-01-05 03:04:05.000007"
    assert bind(moment) == "2026-01-05 03:04:05.000000"


@pytest.mark.parametrize(
    "stored",
    [
        "2026-01-05 03:04:05.000000",
        "2026-01-05 03:04:05.000120",
        "2026-01-05 03:04:05",  # SQLite's CURRENT_TIMESTAMP
        "0999-12-31 23:59:59.999999",
        "2026-01-05",
        None,
    ],
)
def test_utc_datetime_reads_on_sqlite_what_sqlalchemy_reads(stored: str | None) -> None:
    """``UTCDateTime``'s one-function result on SQLite (``fromisoformat``) against
    SQLAlchemy's own two steps (SQLite's ``DATETIME`` parse, ``process_result_value``)."""
    dialect = sqlite.dialect()
    column = UTCDateTime()
    own = column.dialect_impl(dialect).result_processor(dialect, None)
    sqlalchemys = DateTime().dialect_impl(dialect).result_processor(dialect, None)
    assert own is not None and sqlalchemys is not None
    expected = column.process_result_value(sqlalchemys(stored), dialect)
    assert own(stored) == expected
    assert stored is None or own(stored).tzinfo is UTC


def test_utc_datetime_refuses_on_sqlite_the_text_sqlalchemy_refuses() -> None:
    dialect = sqlite.dialect()
    own = UTCDateTime().dialect_impl(dialect).result_processor(dialect, None)
    sqlalchemys = DateTime().dialect_impl(dialect).result_processor(dialect, None)
    assert own is not None and sqlalchemys is not None
    for processor in (own, sqlalchemys):
        with pytest.raises(ValueError):
            processor("2026-1-5 3:04:05")


def test_one_cursor_serves_the_connections_statements_and_no_rows_leak_between_them(
    engine: Engine, tx: Tx, clock: ManualClock
) -> None:
    ids = sorted(_ready_worker(tx, clock) for _ in range(3))
    every = DriverStatement(select(_W.c.id).where(_W.c.pool == POOL).order_by(_W.c.id))
    one = DriverStatement(select(_W.c.id).where(_W.c.id == bindparam("id")))
    with engine.connect() as connection:
        assert every.first(connection, {}).id == ids[0]  # rows left over: ended
        assert [row.id for row in one.all(connection, {"id": ids[2]})] == [ids[2]]
        assert one.first(connection, {"id": "w_none"}) is None
        assert [row.id for row in every.all(connection, {})] == ids


def test_a_first_that_leaves_rows_of_an_update_returning_lets_the_commit_through(
    engine: Engine, tx: Tx, clock: ManualClock
) -> None:
    # On SQLite an unfinished ``UPDATE ... RETURNING`` would fail the ``COMMIT``
    # ("SQL statements in progress") had ``first`` left it open on the kept cursor.
    for _ in range(3):
        _ready_worker(tx, clock)
    touched = DriverStatement(
        update(_W)
        .where(_W.c.pool == POOL)
        .values(state_changed_at=bindparam("now"))
        .returning(_W.c.id)
    )
    later = clock.now() + timedelta(minutes=1)
    with engine.begin() as connection:
        assert touched.first(connection, {"now": later}) is not None
    with engine.connect() as connection:
        moments = connection.execute(select(_W.c.state_changed_at)).scalars().all()
    assert moments == [later] * 3


def test_after_a_failed_statement_the_next_runs_on_a_fresh_cursor(
    engine: Engine, tx: Tx, clock: ManualClock
) -> None:
    tenant_id = add_tenant(tx, clock.now())
    statement = DriverStatement(
        insert(_T).values({name: bindparam(name) for name in ("id", "name", "token_hash")})
    )
    ids = DriverStatement(select(_T.c.id).order_by(_T.c.id))
    row = {"id": tenant_id, "name": "again", "token_hash": "x"}
    with pytest.raises(IntegrityError), engine.begin() as connection:
        assert [found.id for found in ids.all(connection, {})] == [tenant_id]
        statement.run(connection, row)
    with engine.connect() as connection:
        assert [found.id for found in ids.all(connection, {})] == [tenant_id]


def test_a_value_fixed_in_the_statement_is_used_unless_given_and_a_missing_one_raises(
    engine: Engine, tx: Tx, clock: ManualClock
) -> None:
    ids = sorted(_ready_worker(tx, clock) for _ in range(3))
    statement = DriverStatement(
        select(_W.c.id).where(_W.c.pool == bindparam("pool")).order_by(_W.c.id).limit(1)
    )
    with engine.connect() as connection:
        assert [row.id for row in statement.all(connection, {"pool": POOL})] == ids[:1]
        with pytest.raises(KeyError, match="pool"):
            statement.all(connection, {})
