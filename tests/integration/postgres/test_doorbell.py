"""The PostgreSQL doorbell: NOTIFY from the API side, LISTEN in the scheduler, on a real server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from service.doorbell import Listener, PostgresBell, bell_for
from tests.support.postgres import PostgresServer
from tests.support.server import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.fixture
def engine(postgres_server: PostgresServer) -> Iterator[Engine]:
    engine = create_engine(postgres_server.create_database())
    yield engine
    engine.dispose()


@pytest.fixture
def bell(engine: Engine) -> Iterator[PostgresBell]:
    made = bell_for(engine)
    assert isinstance(made, PostgresBell)
    yield made
    made.close()


def _terminate(engine: Engine, application_name: str) -> int:
    """Kill this test database's connections of that name (as a server restart or a
    network cut would); how many there were."""
    return _count(engine, application_name, "count(pg_terminate_backend(pid))")


def _count(engine: Engine, application_name: str, expression: str = "count(*)") -> int:
    conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as admin:
        row = admin.execute(
            f"SELECT {expression} FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            (application_name,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _heard_again(ring: Callable[[], None], listener: Listener) -> bool:
    """Ring until the listener hears it: the side that lost its connection reconnects
    after a 1 s backoff; 60 s bounds a hang."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ring()
        if listener.wait(0.5):
            return True
    return False


def test_a_notify_wakes_the_listener(engine: Engine, bell: PostgresBell) -> None:
    listener = bell.listener()
    try:
        assert listener.wait(0.1) is False  # connects and LISTENs; nothing rang
        threading.Timer(0.2, bell.ring).start()
        # wait() answers True only for a notification; its timeout bounds a lost ring, so
        # no separate speed assertion (that one failed nothing but a slow machine).
        assert listener.wait(60) is True
        assert listener.wait(0.1) is False
    finally:
        listener.close()


def test_the_listener_reconnects_after_its_connection_is_killed(
    engine: Engine, bell: PostgresBell
) -> None:
    listener = bell.listener()
    try:
        assert listener.wait(0.1) is False
        assert _terminate(engine, "workerlease doorbell listen") == 1
        assert listener.wait(0.2) is False  # the loss is noticed, logged and backed off

        assert _heard_again(bell.ring, listener), "the listener never came back"
    finally:
        listener.close()


def test_ringing_while_the_database_is_unreachable_is_harmless() -> None:
    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    try:
        bell = bell_for(engine)
        bell.ring()  # refused connection: logged and counted, not raised
        bell.close()
    finally:
        engine.dispose()


def test_a_burst_of_rings_costs_the_ringer_nothing_and_still_wakes_the_listener(
    bell: PostgresBell,
) -> None:
    listener = bell.listener()
    try:
        assert listener.wait(0.1) is False
        for _ in range(100):
            bell.ring()  # a flag for the bell's own thread, which sends the NOTIFY
        assert listener.wait(60) is True
    finally:
        listener.close()


def test_the_bell_reconnects_after_its_own_connection_is_killed(
    engine: Engine, bell: PostgresBell
) -> None:
    listener = bell.listener()
    try:
        assert listener.wait(0.1) is False
        bell.notify()  # the bell's own autocommit connection, one NOTIFY on it
        assert listener.wait(60) is True
        assert _terminate(engine, "workerlease doorbell notify") == 1
        bell.notify()  # finds its connection gone: counted, not raised, backed off
        assert _heard_again(bell.notify, listener), "the bell never rang again"
    finally:
        listener.close()


def test_closing_the_bell_ends_its_sender_thread_and_connection(
    engine: Engine, bell: PostgresBell
) -> None:
    """An app that ends before its process (every test's) leaves no sender behind."""
    listener = bell.listener()
    try:
        assert listener.wait(0.1) is False
        bell.ring()
        assert listener.wait(60) is True  # the sender thread is up, its connection open
        assert _count(engine, "workerlease doorbell notify") == 1
        senders = _senders()  # other tests' apps may have their own (until closed)
        bell.close()
        assert _senders() == senders - 1
        # The server drops a closed connection's row from pg_stat_activity a moment later.
        wait_until(lambda: _count(engine, "workerlease doorbell notify") == 0, 30)
        bell.ring()  # after close: nothing starts again
        assert _senders() == senders - 1
    finally:
        listener.close()


def _senders() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == "doorbell")
