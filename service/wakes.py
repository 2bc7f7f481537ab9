"""Wakes between processes: a change made in one process wakes the requests another
process holds waiting on it.

A :class:`~service.waiters.Waiters` wakes its own process's waiters directly (a task
submitted, a log chunk stored, a lease activated). A request waiting in another web
process (``serve --workers N``) or on another replica learned of the change only at
its Waiters' next re-read of the database, every 0.5 s: an agent's long poll got a
task submitted on the other process half a second late. On PostgreSQL every process
``LISTEN``s on one channel, and each local wake is also sent there, so the other
processes wake theirs within a round trip.

- The sender is a thread of its own with a queue: a request that wakes never waits
  for the database. Wakes queued while one is being sent go out together (as few
  ``NOTIFY``s as the 8,000-byte payload limit allows).
- A message names its origin (this process), its topic (``lease``, ``poll``, ``log``),
  whether its keys are prefixes, and the keys; a process skips its own.
- The re-read stays: a wake lost while a connection is down costs what it cost
  before, half a second, never a lease or a task. Failures are logged and counted
  (``workerlease_wakes_total``) and the connections made again with backoff.
- SQLite: no relay. Its database is on one host and ``serve`` runs one web process
  by default; the re-read serves a second.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Collection, Iterator

from sqlalchemy.engine import Engine

from service import metrics
from service.doorbell import OwnConnection, conninfo_of

log = logging.getLogger("workerlease.wakes")

CHANNEL = "workerlease_wake"
# PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more.
MAX_PAYLOAD = 7_900
LISTEN_TIMEOUT_S = 1.0

# What a topic's subscriber is called with: the keys, and whether they are prefixes.
Receiver = Callable[[list[str], bool], None]


class Relay(ABC):
    @abstractmethod
    def publish(self, topic: str, keys: Collection[str], *, prefix: bool = False) -> None:
        """Tell the other processes these keys of ``topic`` changed. Never blocks or raises."""

    @abstractmethod
    def subscribe(self, topic: str, receive: Receiver) -> None:
        """Call ``receive`` with the keys another process published on ``topic``."""

    def listen(self) -> None:  # noqa: B027 - a relay that hears nothing has nothing to do
        """Make sure this process hears the others: a wait calls it, so a process forked
        after the relay was made (which only waits, never publishes) listens too."""

    def close(self) -> None:  # noqa: B027 - nothing held
        """Stop its threads and close its connections (an app that ends before its
        process: tests)."""


class NoRelay(Relay):
    def publish(self, topic: str, keys: Collection[str], *, prefix: bool = False) -> None:
        pass

    def subscribe(self, topic: str, receive: Receiver) -> None:
        pass


def relay_for(engine: Engine) -> Relay:
    if engine.url.get_backend_name() == "postgresql":
        return PostgresRelay(conninfo_of(engine))
    return NoRelay()


class PostgresRelay(Relay):
    """``NOTIFY workerlease_wake`` from a sender thread; ``LISTEN`` in another."""

    def __init__(self, conninfo: str) -> None:
        self._sending = OwnConnection(conninfo, name="wakes notify")
        self._listening = OwnConnection(
            conninfo,
            name="wakes listen",
            setup=f"LISTEN {CHANNEL}",
            failures=metrics.WAKES.labels("listen_error"),
        )
        self._lock = threading.Lock()
        self._queued: deque[str] = deque()
        self._queued_event = threading.Event()
        self._receivers: dict[str, Receiver] = {}
        self._threads_pid: int | None = None
        self._origin = ""
        self._closed = False

    def publish(self, topic: str, keys: Collection[str], *, prefix: bool = False) -> None:
        if not keys:
            return
        self._started()
        flag = "p" if prefix else "k"
        for chunk in _chunks(list(keys), MAX_PAYLOAD - 64):
            self._queued.append(f"{self._origin} {topic} {flag} {' '.join(chunk)}")
        self._queued_event.set()

    def subscribe(self, topic: str, receive: Receiver) -> None:
        with self._lock:
            self._receivers[topic] = receive
        self._started()

    def listen(self) -> None:
        self._started()

    def close(self) -> None:
        """Both threads stop within a listen timeout and close their connections."""
        self._closed = True
        self._queued_event.set()

    # -- the two threads ------------------------------------------------------------

    def _started(self) -> None:
        """Both threads run in this process (started on first use: after a fork, the
        child starts its own, under a new origin, with an empty queue)."""
        if self._threads_pid == os.getpid():
            return
        with self._lock:
            if self._threads_pid == os.getpid():
                return
            self._origin = f"{os.getpid()}.{secrets.token_hex(4)}"
            self._queued.clear()
            for target, name in ((self._send, "wakes-send"), (self._listen, "wakes-listen")):
                threading.Thread(target=target, name=name, daemon=True).start()
            self._threads_pid = os.getpid()

    def _send(self) -> None:
        import psycopg  # the postgres extra; only a PostgreSQL deployment gets here

        while not self._closed:
            self._queued_event.wait()
            self._queued_event.clear()
            for payload in _merged(self._take_queued()):
                connection = self._sending.get(psycopg)
                if connection is None:
                    metrics.WAKES.labels("undelivered").inc()
                    continue
                try:
                    connection.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                except psycopg.Error as exc:
                    self._sending.lost(exc)
                    metrics.WAKES.labels("undelivered").inc()
                else:
                    metrics.WAKES.labels("sent").inc()
        self._sending.close()

    def _take_queued(self) -> list[str]:
        taken = []
        while self._queued:
            taken.append(self._queued.popleft())
        return taken

    def _listen(self) -> None:
        import psycopg

        while not self._closed:
            connection = self._listening.get(psycopg)
            if connection is None:
                time.sleep(LISTEN_TIMEOUT_S)  # backing off
                continue
            try:
                for notify in connection.notifies(timeout=LISTEN_TIMEOUT_S):
                    self._received(notify.payload)
            except psycopg.Error as exc:
                self._listening.lost(exc)
        self._listening.close()

    def _received(self, payload: str) -> None:
        try:
            origin, topic, flag, *keys = payload.split(" ")
        except ValueError:
            log.warning("wakes_bad_payload payload=%.80r", payload)
            return
        if origin == self._origin:
            return  # this process woke its own waiters already
        receive = self._receivers.get(topic)
        if receive is None or not keys:
            return
        metrics.WAKES.labels("received").inc()
        try:
            receive(keys, flag == "p")
        except Exception:  # one bad receiver must not stop the wakes of the others
            log.exception("wakes_receive_failed topic=%s", topic)


def _chunks(keys: list[str], limit: int) -> Iterator[list[str]]:
    """``keys`` in runs whose joined length stays under ``limit``."""
    chunk: list[str] = []
    size = 0
    for key in keys:
        if chunk and size + len(key) + 1 > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(key)
        size += len(key) + 1
    if chunk:
        yield chunk


def _merged(messages: list[str]) -> Iterator[str]:
    """Messages joined as one payload per topic and flag, split at the payload limit."""
    by_head: dict[str, list[str]] = {}
    for message in messages:
        origin, topic, flag, joined = message.split(" ", 3)
        by_head.setdefault(f"{origin} {topic} {flag}", []).extend(joined.split(" "))
    for head, keys in by_head.items():
        unique = list(dict.fromkeys(keys))
        for chunk in _chunks(unique, MAX_PAYLOAD - len(head) - 1):
            yield f"{head} {' '.join(chunk)}"
