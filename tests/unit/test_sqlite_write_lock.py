"""Waiting for another process's SQLite write lock (``service.db.begin_immediate``).

Two engines on one file stand in for two processes: each has its own in-process
writer lock, so between them only SQLite's file lock decides, as between ``serve``'s
web worker and its scheduler.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from sqlalchemy import text

from service.db import WEB_CHECKPOINT_PAGES, begin_immediate, checkpoint_wal, make_engine


def _engine(path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS t (n INTEGER)"))
    return engine


def test_a_writer_waits_for_the_other_process_and_then_writes(tmp_path: Path) -> None:
    holder, waiter = _engine(tmp_path / "db"), _engine(tmp_path / "db")
    wrote = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with waiter.begin() as conn:
                conn.execute(text("INSERT INTO t VALUES (2)"))
            wrote.set()
        except BaseException as exc:  # reported to the test below
            errors.append(exc)

    with holder.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (1)"))
        thread = threading.Thread(target=write)
        thread.start()
        # The holder has not committed: the other writer cannot have written.
        assert not wrote.wait(0.2)
    thread.join(30)
    assert not errors and wrote.is_set()
    with holder.connect() as conn:
        assert [r[0] for r in conn.execute(text("SELECT n FROM t ORDER BY n"))] == [1, 2]


def test_a_lock_held_past_the_limit_is_the_usual_database_is_locked(tmp_path: Path) -> None:
    holder = _engine(tmp_path / "db")
    other = sqlite3.connect(tmp_path / "db", isolation_level=None)
    try:
        with holder.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))
            with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                begin_immediate(other, timeout_s=0.05)
        # The busy timeout for everything else is back to 30 s, and the lock is free now.
        assert other.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
        begin_immediate(other)
        other.execute("ROLLBACK")
    finally:
        other.close()


GEVENT_SCRIPT = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()
    import sys, gevent
    from sqlalchemy import text
    from service.db import make_engine

    path = sys.argv[1]
    holder, waiter = make_engine(f"sqlite:///{path}"), make_engine(f"sqlite:///{path}")
    with holder.begin() as conn:
        conn.execute(text("CREATE TABLE t (n INTEGER)"))
    order = []

    def write():
        with waiter.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (2)"))
        order.append("waiter wrote")

    with holder.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (1)"))
        greenlet = gevent.spawn(write)
        gevent.sleep(0.2)  # the waiter is waiting for the lock now
        order.append("holder ran on")
    greenlet.join(20)
    print(",".join(order))
    """
)


def test_under_gevent_the_wait_lets_the_other_requests_of_the_process_run(
    tmp_path: Path,
) -> None:
    # SQLite's own busy handler would stop the whole process in C: the holder (another
    # greenlet of the same process here, as a request would be) could not run on, so it
    # could never commit, and the waiter would fail after the 30 s busy timeout.
    done = subprocess.run(
        [sys.executable, "-c", GEVENT_SCRIPT, str(tmp_path / "db")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "holder ran on,waiter wrote"


def _wal_bytes(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def _commits(engine, count: int) -> None:  # type: ignore[no-untyped-def]
    for _ in range(count):
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (randomblob(3000))"))


def test_a_checkpoint_from_elsewhere_lets_the_log_start_over(tmp_path: Path) -> None:
    # The web worker's engine leaves checkpoints to the scheduler's ``checkpoint_wal``.
    path = tmp_path / "db"
    web = make_engine(f"sqlite:///{path}", wal_autocheckpoint=WEB_CHECKPOINT_PAGES)
    scheduler = make_engine(f"sqlite:///{path}")
    with web.begin() as conn:
        conn.execute(text("CREATE TABLE t (b BLOB)"))
    _commits(web, 100)
    grown = _wal_bytes(path)
    _commits(web, 100)
    assert _wal_bytes(path) > grown  # nobody checkpointed: the log only grows
    checkpoint_wal(scheduler)
    before = _wal_bytes(path)
    _commits(web, 100)
    # Checkpointed, the next commits write the log from its start again.
    assert _wal_bytes(path) == before
    with web.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 300
