"""Engine, sessions and row locks, the same on SQLite and PostgreSQL.

SQLite: WAL, a busy timeout, and every transaction begins with ``BEGIN
IMMEDIATE`` so writers queue on the lock instead of failing with "database is
locked" when a deferred transaction tries to upgrade (SQLAlchemy's documented
pysqlite recipe). ``synchronous=NORMAL`` in WAL survives a process crash
(SIGKILL), not a power cut; production runs on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Generic, TypeVar

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql import Select
from sqlmodel import Session, create_engine

S = TypeVar("S", bound=Select[Any])


# SQLite copies its write-ahead log back into the database file ("checkpoints") inside
# the commit that takes the log past this many pages: SQLite's default, kept wherever
# no other process checkpoints.
INLINE_CHECKPOINT_PAGES = 1000
# ``serve``'s web worker: its scheduler process checkpoints every second
# (``checkpoint_wal``), so a request's commit checkpoints (~40 MiB) only if that fell
# far behind or no scheduler runs. A checkpoint writes the pages and fsyncs, and in the
# web worker it stopped every request of the process while it did (1,000 pages, a few
# dozen lease cycles' worth, took up to 50-100 ms here).
WEB_CHECKPOINT_PAGES = 10_000


def make_engine(
    url: str, pool_size: int = 10, *, wal_autocheckpoint: int = INLINE_CHECKPOINT_PAGES
) -> Engine:
    """``wal_autocheckpoint``: SQLite only, see ``INLINE_CHECKPOINT_PAGES``."""
    if url.startswith("sqlite"):
        return _sqlite_engine(url, wal_autocheckpoint)
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_timeout=10,
        connect_args={"connect_timeout": 5} if "psycopg" in url else {},
    )


_HOLDS_WRITER = "workerlease_holds_writer_lock"


MEMORY_URL = "sqlite://"


def _sqlite_engine(url: str, wal_autocheckpoint: int) -> Engine:
    connect_args = {"check_same_thread": False, "timeout": 30}
    in_memory = make_url(url).database in (None, "", ":memory:")
    if in_memory:
        # One connection for every session: each new connection to an in-memory
        # database would be a new, empty database (``workerlease simulate``'s replay).
        engine = create_engine(
            url, connect_args=connect_args, poolclass=StaticPool, json_deserializer=_json_loads
        )
    else:
        engine = create_engine(url, connect_args=connect_args, json_deserializer=_json_loads)

    writes = _SQLiteBegin(in_memory)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Take control of BEGIN ourselves (see module docstring).
        dbapi_connection.isolation_level = None
        # Where a held connection finds how to begin on the driver (``_HeldTransaction``).
        record.info[_SQLITE_BEGIN] = writes
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA wal_autocheckpoint={int(wal_autocheckpoint)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        options = connection.get_execution_options()
        held: _HeldTransaction | None = options.get(_HELD)
        if held is not None and held.adopt():
            return  # begun already, on the driver connection
        writes.begin(
            connection.connection.dbapi_connection,
            connection.info,
            read_only=bool(options.get(READ_ONLY)),
        )

    def _release(connection: Any) -> None:
        writes.release(connection.info)

    event.listen(engine, "commit", _release)
    event.listen(engine, "rollback", _release)
    return engine


_SQLITE_BEGIN = "workerlease_sqlite_begin"


class _SQLiteBegin:
    """How one SQLite engine's transactions begin (``BEGIN IMMEDIATE``, see the module
    docstring) and let go of the write lock.

    Writers of this process queue on a lock before asking SQLite: SQLite's own busy
    handler sleeps in growing steps (up to 100 ms) and is not first come, first served,
    which shows as a long latency tail under concurrent lease requests. Readers take no
    write lock (WAL lets them run beside the writer).
    """

    def __init__(self, in_memory: bool) -> None:
        self._writer = threading.Lock()
        self._in_memory = in_memory

    def begin(self, dbapi_connection: Any, info: dict[Any, Any], *, read_only: bool) -> None:
        """``info``: the connection's own (``Connection.info``), which ``release`` reads."""
        if read_only:
            # On the driver's connection, as ``begin_immediate``: an empty read
            # transaction, its BEGIN through SQLAlchemy's execution machinery, took
            # 150 us against 75 us for an empty write one (in-memory SQLite).
            dbapi_connection.execute("BEGIN")
            return
        self._writer.acquire()
        info[_HOLDS_WRITER] = True
        try:
            if self._in_memory:
                # No other process can hold this database's lock, and ``_writer`` queues
                # this one's writers: nothing to wait for, so no busy-timeout dance (its
                # two PRAGMAs took 0.3 s of a simulated day, 4.5x the BEGIN itself).
                dbapi_connection.execute("BEGIN IMMEDIATE")
            else:
                begin_immediate(dbapi_connection)
        except BaseException:
            self.release(info)
            raise

    def release(self, info: dict[Any, Any]) -> None:
        if info.pop(_HOLDS_WRITER, False):
            self._writer.release()


def _json_loads(text: str) -> Any:
    """``json.loads``, with the empty object and list that most JSON columns hold (a pool's
    options, capabilities and schedules) made without the parser: each pass reads the
    pools' rows, and their three ``json.loads`` were half of that read (~25 us of 53).
    A new object each time, as the parser's: callers may change what they are given."""
    if text == "{}":
        return {}
    if text == "[]":
        return []
    return json.loads(text)


BUSY_TIMEOUT_S = 30.0
# How often a writer asks again for the lock another process holds: SQLite checks the
# lock in microseconds, so a millisecond's poll costs little and finds it soon after
# the other process commits.
WRITE_LOCK_POLL_S = 0.001


def begin_immediate(dbapi_connection: Any, timeout_s: float = BUSY_TIMEOUT_S) -> None:
    """``BEGIN IMMEDIATE``, waiting for another process's write lock in Python, not in SQLite.

    SQLite's busy handler waits in C (``sqlite3_sleep``): under ``serve``'s gevent worker
    that stops every request of the process until the scheduler process commits, then
    oversleeps it in steps of up to 100 ms (measured: 7 s of such stalls, up to 188 ms
    each, in one warm-lease benchmark). Here the first try does not wait at all, and the
    retries sleep with ``time.sleep``, which gevent turns into a switch to the other
    requests and a thread into a release of the GIL. Same 30 s limit and the same
    "database is locked" error after it as the busy timeout everywhere else.
    """
    dbapi_connection.execute("PRAGMA busy_timeout=0")
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                dbapi_connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(WRITE_LOCK_POLL_S)
    finally:
        dbapi_connection.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF == sqlite3.SQLITE_BUSY
    return "database is locked" in str(exc)


def checkpoint_wal(engine: Engine) -> None:
    """Copy SQLite's write-ahead log into the database file, in this process, now.

    ``PASSIVE``: it neither waits for nor blocks readers and writers, and copies what no
    reader still needs; the next writer then starts the log from its beginning. Outside
    any transaction (a checkpoint cannot run in one), on a pooled connection. Nothing on
    PostgreSQL, which checkpoints itself.
    """
    if engine.dialect.name != "sqlite":
        return
    connection = engine.raw_connection()
    try:
        connection.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)")  # type: ignore[union-attr]
    finally:
        connection.close()


READ_ONLY = "workerlease_read_only"


def session_factory(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions for writing, or (``read_only``) for reading without the SQLite write lock."""
    bind = engine.execution_options(**{READ_ONLY: True}) if read_only else engine
    return sessionmaker(bind, class_=Session, expire_on_commit=False)


def held_session_factories(engine: Engine) -> tuple[sessionmaker[Session], sessionmaker[Session]]:
    """Sessions for writing and for reading (as ``session_factory``), each kind on one
    connection held open; close them with ``close_held``.

    For a database that one thread uses alone (``workerlease simulate``'s in-memory one:
    a single DBAPI connection under StaticPool, whatever is checked out). Checking a
    connection out of the pool and back in for every transaction took a third of an
    empty transaction's time there (about 55 us of 150-220 us).
    """
    write = engine.connect()
    read = engine.connect().execution_options(**{READ_ONLY: True})
    return HeldSessions(write), HeldSessions(read)


def close_held(*factories: sessionmaker[Session]) -> None:
    for factory in factories:
        factory.kw["bind"].close()


_HELD = "workerlease_held_transaction"


class _HeldTransaction:
    """The transaction of one held connection, begun and committed on its driver
    connection while SQLAlchemy's ``Connection`` has no part in it.

    SQLAlchemy's begin and commit (its transaction object, the engine's ``begin`` and
    ``commit`` events and their listeners) cost more than SQLite's own ``BEGIN
    IMMEDIATE`` and ``COMMIT`` on the replay's ~8 transactions a request: without them a
    replayed request took 7.40 M instructions instead of 7.87 M (callgrind). The begin is
    the engine's own (``_SQLiteBegin``: the same write lock, the same ``BEGIN``).
    Whatever needs SQLAlchemy's transaction then (a Core ``execute``, which would
    autobegin, or the ORM's transaction joining the connection's) begins one on the
    connection, and the engine's ``begin`` listener lets it take this one over
    (``adopt``) instead of a second ``BEGIN``; from then on SQLAlchemy commits or rolls
    back, and its listeners let go of the write lock, as for any transaction.

    Not for engines other than SQLite's (``_SQLITE_BEGIN`` missing): their transactions
    begin on the ``Connection`` as before.
    """

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._info = connection.info
        self._begin: _SQLiteBegin | None = self._info.get(_SQLITE_BEGIN)
        self._driver: Any = connection.connection.driver_connection
        self._read_only = bool(connection.get_execution_options().get(READ_ONLY))
        self._on_driver = False  # begun on the driver, SQLAlchemy not told
        connection.execution_options(**{_HELD: self})

    def begin(self) -> None:
        """A transaction on the connection, unless one is under way."""
        if self._on_driver or self.connection.in_transaction():
            return
        if self._begin is None:
            self.connection.begin()
            return
        self._begin.begin(self._driver, self._info, read_only=self._read_only)
        self._on_driver = True

    def adopt(self) -> bool:
        """SQLAlchemy begins on the connection: True if it takes over this transaction."""
        adopted, self._on_driver = self._on_driver, False
        return adopted

    def active(self) -> bool:
        return self._on_driver or self.connection.in_transaction()

    def commit(self) -> None:
        if not self._on_driver:
            self.connection.commit()
            return
        self._on_driver = False
        try:
            self._driver.commit()
        except BaseException:
            # As SQLAlchemy's failed commit: nothing of the transaction stays.
            self._driver.rollback()
            raise
        finally:
            assert self._begin is not None
            self._begin.release(self._info)


class HeldSession(Session):
    """A session on a held connection (``HeldSessions``) whose transactions that use no
    ORM object run on the connection alone.

    Nearly every transaction of the replay runs only Core and driver statements (455 ORM
    statements in 10,889 transactions of a simulated day), yet the ORM's transaction
    (``SessionTransaction``: its begin, snapshot, commit and close with their events)
    was most of an empty one's ~93 us (~22-40 us here, with ``HeldSessions``' reuse; a
    raw ``BEGIN IMMEDIATE``/``COMMIT`` 4.5 us). Here ``connection()`` with no ORM
    transaction begins the connection's own (``_HeldTransaction``, on the driver); the
    ORM's, if it comes, joins it and takes control (``join_transaction_mode=
    "control_fully"``), so commit, rollback and close then run as on any session.
    Without one, ``commit`` runs what the ORM's would for such a transaction: the
    ``before_commit`` listeners (the audit rows, ``states._write_events``), then the
    connection's commit; a rollback lets an ORM transaction join first and rolls back
    through it (its ``after_soft_rollback`` listener drops the unwritten audit rows).
    ``after_commit`` and ``after_transaction_end`` are not dispatched on that path: the
    only listener of either is ``_connection_released``, whose work ``_end_core`` does.
    """

    _idle: list[HeldSession]
    _held: _HeldTransaction

    def connection(
        self,
        bind_arguments: Any = None,
        execution_options: Any = None,
    ) -> Connection:
        if self._transaction is not None or bind_arguments or execution_options:
            return super().connection(bind_arguments, execution_options)
        self._held.begin()
        connection = self._held.connection
        self.info[_CONNECTION] = connection
        return connection

    def commit(self) -> None:
        if self._transaction is None:
            self.dispatch.before_commit(self)
            if self._transaction is None:  # the listeners began no ORM transaction
                self._end_core()
                return
        super().commit()

    def rollback(self) -> None:
        if self._transaction is None and self._held.active():
            super().connection()  # the ORM's transaction joins, to roll back as its own
        super().rollback()

    def close(self) -> None:
        if self._transaction is None and self._held.active():
            self.rollback()
        if self._transaction is not None or self.identity_map or self._new or self._deleted:
            # Nothing of the ORM's to drop otherwise: its close would build a new
            # identity map for nothing (most of an empty transaction's close here).
            super().close()
        self.info.clear()  # as a new session's: nothing of this one's transactions
        if self not in self._idle:
            self._idle.append(self)

    def _end_core(self) -> None:
        self._held.commit()
        self.info.pop(_CONNECTION, None)


class HeldSessions(sessionmaker[Session]):
    """``HeldSession``s on one held connection, each reused once closed.

    A session's construction was ~10 % of an empty transaction. More than one may be
    open at once (a scope inside another, on another factory), hence a list of idle ones.
    """

    def __init__(self, connection: Connection) -> None:
        super().__init__(
            connection,
            class_=HeldSession,
            expire_on_commit=False,
            join_transaction_mode="control_fully",
        )
        self._idle: list[HeldSession] = []
        self._held = _HeldTransaction(connection)

    def __call__(self, **local_kw: Any) -> HeldSession:
        if self._idle and not local_kw:
            return self._idle.pop()
        session = super().__call__(**local_kw)
        assert isinstance(session, HeldSession)
        session._idle = self._idle
        session._held = self._held
        return session


def transaction(session: Session) -> AbstractContextManager[Session]:
    """One transaction on an open session: commit on success, roll back on any error."""
    return _Transaction(session)


def session_scope(factory: sessionmaker[Session]) -> AbstractContextManager[Session]:
    """A new session for one transaction, closed afterwards."""
    return _SessionScope(factory)


# ``transaction`` and ``session_scope`` as classes: as generators (``@contextmanager``),
# one nested in the other, a scope's entry and exit took 22,300 instructions against
# 6,400 (callgrind, a session whose methods do nothing), ~8 scopes a replayed request.


class _Transaction:
    __slots__ = ("session",)

    def __init__(self, session: Session) -> None:
        self.session = session

    def __enter__(self) -> Session:
        return self.session

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        _end(self.session, failed=kind is not None)


class _SessionScope:
    __slots__ = ("_factory", "session")

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self._factory = factory

    def __enter__(self) -> Session:
        self.session = self._factory()
        return self.session

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        try:
            _end(self.session, failed=kind is not None)
        finally:
            self.session.close()


def _end(session: Session, *, failed: bool) -> None:
    if failed:
        session.rollback()
        return
    try:
        session.commit()
    except BaseException:
        session.rollback()
        raise


@contextmanager
def read_scope(factory: sessionmaker[Session]) -> Iterator[Connection]:
    """One read transaction on a connection of the factory's engine, without an ORM
    session: for the reads that waiting requests repeat (an agent's poll looks, its token),
    where building a session cost more than their one SELECT."""
    engine: Engine = factory.kw["bind"]
    with engine.connect() as connection, connection.begin():
        yield connection


def core_connection(session: Session) -> Connection:
    """The session's connection, for a statement run in Core (no ORM result objects: on
    SQLite the ORM's per-statement work cost more than the counts and range reads the
    passes repeat). The session's pending changes are flushed first, as autoflush would.

    The connection of the transaction under way is kept in ``session.info`` from its
    begin to its end (``_held_connection``): ``session.connection()`` walks SQLAlchemy's
    transaction states on every call, and a replay's transaction asks ~3 times (a
    transaction of three small statements on in-memory SQLite: 12-20 us less of ~120)."""
    session.flush()
    return transaction_connection(session)


def transaction_connection(session: Session) -> Connection:
    """``session.connection()`` without a flush, for the hot statements that need none
    (their own writes, the audit rows' insert inside a flush)."""
    connection: Connection | None = session.info.get(_CONNECTION)
    return session.connection() if connection is None else connection


_CONNECTION = "workerlease_transaction_connection"


@event.listens_for(Session, "after_begin")
def _held_connection(session: Session, _transaction: Any, connection: Connection) -> None:
    session.info[_CONNECTION] = connection


@event.listens_for(Session, "after_transaction_end")
def _connection_released(session: Session, _transaction: Any) -> None:
    session.info.pop(_CONNECTION, None)


def with_row_locks(
    statement: S, session: Session, *, skip_locked: bool = True, of: Any = None
) -> S:
    """``FOR UPDATE [SKIP LOCKED]`` where the database has row locks (Airflow's helper).

    On SQLite this is a no-op: ``BEGIN IMMEDIATE`` already serialises writers.
    """
    if session.get_bind().dialect.name == "sqlite":
        return statement
    return statement.with_for_update(skip_locked=skip_locked, of=of)


class Prepared(Generic[S]):
    """A hot-path statement built once, with its row-locking variant built once too.

    Building a statement and its cache key costs more than running it on SQLite
    (about 100 us of the 170 us a small SELECT took); values go in as bound
    parameters (``bindparam``) at execution.
    """

    def __init__(self, statement: S, *, skip_locked: bool = True, of: Any = None) -> None:
        self.plain = statement
        self.locked = statement.with_for_update(skip_locked=skip_locked, of=of)

    def for_update(self, session: Session) -> S:
        """As ``with_row_locks``: the locking variant where the database has row locks."""
        return self.plain if is_sqlite(session) else self.locked


def is_sqlite(session: Session) -> bool:
    return session.get_bind().dialect.name == "sqlite"


def lock_job(session: Session, job: str) -> None:
    """Serialise one job across replicas for the rest of the transaction.

    PostgreSQL: a transaction-scoped advisory lock. SQLite: ``BEGIN IMMEDIATE``
    already holds the database's single write lock.
    """
    if is_sqlite(session):
        return
    key = int.from_bytes(
        hashlib.sha256(f"workerlease:{job}".encode()).digest()[:8], "big", signed=True
    )
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
