"""The SQLite doorbell: real datagrams on a real abstract UNIX socket."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from service import doorbell
from service.doorbell import NoBell, PostgresBell, SocketBell, bell_for, socket_address


def _bell(tmp_path: Path) -> SocketBell:
    bell = bell_for(create_engine(f"sqlite:///{tmp_path / 'workerlease.db'}"))
    assert isinstance(bell, SocketBell)
    return bell


def test_each_database_file_has_its_own_bell(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert socket_address(str(tmp_path / "a" / ".." / "x.db")) == socket_address(
        str(tmp_path / "x.db")
    )
    assert socket_address(str(tmp_path / "x.db")) != socket_address(str(tmp_path / "y.db"))
    assert isinstance(bell_for(create_engine("sqlite://")), NoBell)  # in-memory: no host file
    assert isinstance(
        bell_for(create_engine("postgresql+psycopg://u@127.0.0.1:1/db")), PostgresBell
    )


def test_a_ring_wakes_the_listener_and_rings_together_wake_it_once(tmp_path: Path) -> None:
    bell = _bell(tmp_path)
    listener = bell.listener()
    try:
        assert listener.wait(0.05) is False  # nothing rang: the poll's timeout
        for _ in range(5):
            bell.ring()
        assert listener.wait(5) is True
        assert listener.wait(0.05) is False  # the five were one wake-up
    finally:
        listener.close()


def test_a_ring_while_waiting_ends_the_wait_at_once(tmp_path: Path) -> None:
    bell = _bell(tmp_path)
    listener = bell.listener()
    try:
        threading.Timer(0.2, bell.ring).start()
        started = time.monotonic()
        assert listener.wait(30) is True
        assert time.monotonic() - started < 10
    finally:
        listener.close()


def test_ringing_with_nobody_listening_is_harmless(tmp_path: Path) -> None:
    _bell(tmp_path).ring()  # no scheduler bound: nothing raised, nothing blocks


def test_a_second_listener_polls_until_the_first_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doorbell._SocketListener, "REBIND_S", 0.0)
    bell = _bell(tmp_path)
    first = bell.listener()
    second = bell.listener()
    try:
        bell.ring()
        assert first.wait(5) is True
        assert second.wait(0.05) is False  # not bound: it sleeps the interval
        first.close()
        assert second.wait(0.05) is False  # binds now
        bell.ring()
        assert second.wait(5) is True
    finally:
        first.close()
        second.close()
