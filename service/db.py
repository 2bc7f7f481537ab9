"""Engine, sessions and row locks, the same on SQLite and PostgreSQL.

SQLite: WAL, a busy timeout, and every transaction begins with ``BEGIN
IMMEDIATE`` so writers queue on the lock instead of failing with "database is
locked" when a deferred transaction tries to upgrade (SQLAlchemy's documented
pysqlite recipe). ``synchronous=NORMAL`` in WAL survives a process crash
(SIGKILL), not a power cut; production runs on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql import Select
from sqlmodel import Session, create_engine

S = TypeVar("S", bound=Select[Any])


def make_engine(url: str, pool_size: int = 10) -> Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
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


def _sqlite_engine(url: str) -> Engine:
    connect_args = {"check_same_thread": False, "timeout": 30}
    if make_url(url).database in (None, "", ":memory:"):
        # One connection for every session: each new connection to an in-memory
        # database would be a new, empty database (``workerlease simulate``'s replay).
        engine = create_engine(url, connect_args=connect_args, poolclass=StaticPool)
    else:
        engine = create_engine(url, connect_args=connect_args)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take control of BEGIN ourselves (see module docstring).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    # Writers of this process queue on a lock before asking SQLite: SQLite's own busy
    # handler sleeps in growing steps (up to 100 ms) and is not first come, first served,
    # which shows as a long latency tail under concurrent lease requests.
    writer = threading.Lock()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Readers take no write lock (WAL lets them run beside the writer); writers queue.
        if connection.get_execution_options().get(READ_ONLY):
            connection.exec_driver_sql("BEGIN")
            return
        writer.acquire()
        connection.info[_HOLDS_WRITER] = True
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            _release(connection)
            raise

    def _release(connection: Any) -> None:
        if connection.info.pop(_HOLDS_WRITER, False):
            writer.release()

    event.listen(engine, "commit", _release)
    event.listen(engine, "rollback", _release)
    return engine


READ_ONLY = "workerlease_read_only"


def session_factory(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions for writing, or (``read_only``) for reading without the SQLite write lock."""
    bind = engine.execution_options(**{READ_ONLY: True}) if read_only else engine
    return sessionmaker(bind, class_=Session, expire_on_commit=False)


@contextmanager
def transaction(session: Session) -> Iterator[Session]:
    """One transaction on an open session: commit on success, roll back on any error."""
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A new session for one transaction, closed afterwards."""
    session = factory()
    try:
        with transaction(session):
            yield session
    finally:
        session.close()


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
    passes repeat). The session's pending changes are flushed first, as autoflush would."""
    session.flush()
    return session.connection()


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

    def __init__(self, statement: S, *, skip_locked: bool = True) -> None:
        self.plain = statement
        self.locked = statement.with_for_update(skip_locked=skip_locked)

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
