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

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.fixture
def engine(postgres_server: PostgresServer) -> Iterator[Engine]:
    engine = create_engine(postgres_server.create_database())
    yield engine
    engine.dispose()


def _bell(engine: Engine) -> PostgresBell:
    bell = bell_for(engine)
    assert isinstance(bell, PostgresBell)
    return bell


def _terminate(engine: Engine, application_name: str) -> int:
    """Kill this test database's connections of that name (as a server restart or a
    network cut would); how many there were."""
    conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
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


def test_a_notify_wakes_the_listener(engine: Engine) -> None:
    bell = _bell(engine)
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


def test_the_listener_reconnects_after_its_connection_is_killed(engine: Engine) -> None:
    bell = _bell(engine)
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
        _bell(engine).ring()  # refused connection: logged and counted, not raised
    finally:
        engine.dispose()


def test_a_burst_of_rings_costs_the_ringer_nothing_and_still_wakes_the_listener(
    engine: Engine,
) -> None:
    bell = _bell(engine)
    listener = bell.listener()
    try:
        assert listener.wait(0.1) is False
        for _ in range(100):
            bell.ring()  # a flag for the bell's own thread, which sends the NOTIFY
        assert listener.wait(60) is True
    finally:
        listener.close()


def test_the_bell_reconnects_after_its_own_connection_is_killed(engine: Engine) -> None:
    bell = _bell(engine)
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
