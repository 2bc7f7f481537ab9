"""Wakes between processes over a real PostgreSQL server: a Waiters woken in one
"process" (a relay of its own, as each web process and replica has) wakes the waiters
of another. The re-read is set to ten minutes, so only the relay can wake them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator

import pytest
from sqlalchemy import create_engine

from service.waiters import Waiters
from service.wakes import PostgresRelay, relay_for
from tests.support.postgres import PostgresServer

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

DEADLINE_S = 60.0  # bounds a lost wake; a delivered one takes a round trip


def _never_settled(_keys: Collection[str]) -> set[str]:
    return set()


@pytest.fixture
def relays(postgres_server: PostgresServer) -> Iterator[tuple[PostgresRelay, PostgresRelay]]:
    engine = create_engine(postgres_server.create_database())
    pair = (relay_for(engine), relay_for(engine))
    assert all(isinstance(relay, PostgresRelay) for relay in pair)
    yield pair  # type: ignore[misc]
    for relay in pair:
        assert isinstance(relay, PostgresRelay)
        relay.close()
    engine.dispose()


def _waiters(relay: PostgresRelay, topic: str) -> Waiters:
    return Waiters(_never_settled, recheck_s=600, relay=relay, topic=topic)


def _wait_in_thread(waiters: Waiters, key: str) -> tuple[threading.Thread, list[bool]]:
    """A waiter registered (watching) before the thread returns, so no wake is missed."""
    outcome: list[bool] = []
    watching = threading.Event()

    def wait() -> None:
        with waiters.watch(key) as event:
            watching.set()
            outcome.append(event.wait(DEADLINE_S))

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    assert watching.wait(DEADLINE_S)
    return thread, outcome


def _notified_until_woken(send: Callable[[], None], thread: threading.Thread) -> None:
    """The other relay's LISTEN may not be up yet when the first wake goes out (a wake
    before it is lost, as in production, where the re-read covers it): send again until
    the waiter wakes, within the deadline."""
    for _ in range(int(DEADLINE_S / 0.5)):
        send()
        thread.join(0.5)
        if not thread.is_alive():
            return


def test_a_notify_in_one_process_wakes_the_waiter_of_another(
    relays: tuple[PostgresRelay, PostgresRelay],
) -> None:
    here, there = _waiters(relays[0], "poll"), _waiters(relays[1], "poll")
    thread, outcome = _wait_in_thread(there, "worker-1")
    _notified_until_woken(lambda: here.notify(["worker-1"]), thread)
    assert outcome == [True]


def test_a_prefix_wakes_every_key_under_it_elsewhere_and_no_other(
    relays: tuple[PostgresRelay, PostgresRelay],
) -> None:
    here, there = _waiters(relays[0], "log"), _waiters(relays[1], "log")
    under, _ = _wait_in_thread(there, "task-1@4096")
    with there.watch("task-2@0") as other:
        _notified_until_woken(lambda: here.notify_prefix("task-1@"), under)
        assert not under.is_alive()
        assert not other.is_set()


def test_topics_stay_apart(relays: tuple[PostgresRelay, PostgresRelay]) -> None:
    here = _waiters(relays[0], "poll")
    leases, polls = _waiters(relays[1], "lease"), _waiters(relays[1], "poll")
    thread, outcome = _wait_in_thread(polls, "same-id")
    with leases.watch("same-id") as lease_event:
        _notified_until_woken(lambda: here.notify(["same-id"]), thread)
        assert outcome == [True]
        assert not lease_event.is_set()
