"""The demand doorbell: a lease that has to wait wakes the scheduler's demand pass at once.

Without it, a lease queued for a new worker (``min_ready: 0``, or a drained pool)
also waits for the next demand poll (``scheduler.demand_interval``). The bell is
a hint only: the poll stays, so a ring that is lost (scheduler restarting or on
another host, full socket buffer, database away) costs at most one interval,
never a lease.

- SQLite: the database lives on one host, so the bell is a datagram to a Linux
  abstract UNIX socket named after the database file (no file left behind, no
  path length limit). The scheduler binds it; API processes send to it.
- PostgreSQL: ``NOTIFY workerlease_demand``; the scheduler LISTENs on a
  connection of its own, so API replicas on other hosts ring it too.
- Anything else (an in-memory SQLite database): no bell, the poll alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from typing import Any

from sqlalchemy.engine import Engine

from service import metrics

log = logging.getLogger("workerlease.doorbell")

CHANNEL = "workerlease_demand"
RECONNECT_MAX_S = 30.0


class Listener(ABC):
    @abstractmethod
    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True when the bell rang. Never raises."""

    def close(self) -> None:  # noqa: B027 - most listeners hold nothing
        """Release what the listener holds."""


class Bell(ABC):
    @abstractmethod
    def ring(self) -> None:
        """Wake the scheduler's demand pass, best effort. Never raises."""

    @abstractmethod
    def listener(self) -> Listener:
        """What the scheduler waits on."""

    def close(self) -> None:  # noqa: B027 - most bells hold nothing
        """Stop what ringing started (a sender thread, its connection)."""


class _Sleep(Listener):
    def wait(self, timeout: float) -> bool:
        time.sleep(timeout)
        return False


class NoBell(Bell):
    def ring(self) -> None:
        pass

    def listener(self) -> Listener:
        return _Sleep()


def bell_for(engine: Engine, enabled: bool = True) -> Bell:
    url = engine.url
    if not enabled:
        return NoBell()
    if url.get_backend_name() == "postgresql":
        return PostgresBell(engine)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return SocketBell(socket_address(url.database))
    return NoBell()


def socket_address(database_file: str) -> bytes:
    """The abstract socket name for one SQLite database file (same file, same name)."""
    digest = hashlib.sha256(os.path.realpath(database_file).encode()).hexdigest()[:32]
    return b"\0workerlease-demand-" + digest.encode()


class SocketBell(Bell):
    def __init__(self, address: bytes) -> None:
        self.address = address
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)

    def ring(self) -> None:
        try:
            self._sender.sendto(b"demand", self.address)
        except OSError:
            # Nobody bound (no scheduler on this host right now) or its buffer is
            # full (it is ringing already): the poll covers both.
            metrics.DOORBELL.labels("undelivered").inc()
        else:
            metrics.DOORBELL.labels("rang").inc()

    def listener(self) -> Listener:
        return _SocketListener(self.address)


class _SocketListener(Listener):
    REBIND_S = 5.0

    def __init__(self, address: bytes) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        self._next_bind = 0.0
        self._bind()

    def _bind(self) -> None:
        if time.monotonic() < self._next_bind:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self._address)
        except OSError as exc:
            # Another scheduler of this database listens (or one that is stopping
            # still does): poll, and try again later.
            sock.close()
            if self._next_bind == 0.0:
                log.info("doorbell_unavailable reason=%s; polling until it is free", exc)
            self._next_bind = time.monotonic() + self.REBIND_S
            return
        self._sock = sock

    def wait(self, timeout: float) -> bool:
        if self._sock is None:
            self._bind()
        if self._sock is None:
            time.sleep(timeout)
            return False
        self._sock.settimeout(timeout)
        try:
            self._sock.recv(64)
        except TimeoutError:
            return False
        except OSError:
            log.warning("doorbell_receive_failed", exc_info=True)
            time.sleep(timeout)
            return False
        self._drain()
        return True

    def _drain(self) -> None:
        """Rings that arrived together are one wake-up."""
        assert self._sock is not None
        self._sock.setblocking(False)
        try:
            while True:
                self._sock.recv(64)
        except OSError:
            pass

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


class PostgresBell(Bell):
    """NOTIFY from a thread of its own: ``ring`` only sets a flag, so a lease that rings
    never waits for a connection and a commit (a NOTIFY took 0.8-1.1 ms here, and as
    much inside the lease's own transaction: bench --only refill). Rings that come
    while one is being sent make one NOTIFY.

    The NOTIFY goes out on an autocommit connection the sender keeps (one round trip),
    not on one of the engine's pool: a checkout's ping, the statement and the commit
    cost the web worker 0.3 ms of CPU a warm lease, a tenth of the lease itself."""

    def __init__(self, engine: Engine) -> None:
        self._connection = OwnConnection(conninfo_of(engine), name="doorbell notify")
        self._rung = threading.Event()
        self._lock = threading.Lock()
        self._sender: threading.Thread | None = None
        self._closed = False

    def ring(self) -> None:
        if self._closed:
            return
        self._rung.set()
        sender = self._sender
        if sender is not None and sender.is_alive():
            return
        with self._lock:  # started on first use: after a fork the child starts its own
            if self._sender is None or not self._sender.is_alive():
                self._sender = threading.Thread(
                    target=self._send_rings, name="doorbell", daemon=True
                )
                self._sender.start()

    def _send_rings(self) -> None:
        while True:
            self._rung.wait()
            self._rung.clear()
            if self._closed:
                self._connection.close()
                return
            self.notify()

    def close(self) -> None:
        """The sender thread ends (closing its connection) at its next wake, which this is:
        an app that ends before its process (tests) leaves no thread behind."""
        self._closed = True
        sender = self._sender
        if sender is not None and sender.is_alive():
            self._rung.set()
            sender.join(timeout=5)
        else:
            self._connection.close()

    def notify(self) -> None:
        """One NOTIFY, now. Never raises: a ring that cannot go out is counted, and the
        connection is made again (with backoff) for the next one."""
        import psycopg  # the postgres extra; only a PostgreSQL deployment gets here

        connection = self._connection.get(psycopg)
        if connection is None:
            metrics.DOORBELL.labels("undelivered").inc()
            return
        try:
            connection.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
        except psycopg.Error as exc:
            self._connection.lost(exc)
            metrics.DOORBELL.labels("undelivered").inc()
        else:
            metrics.DOORBELL.labels("rang").inc()

    def listener(self) -> Listener:
        return _PostgresListener(self._connection.conninfo)


def conninfo_of(engine: Engine) -> str:
    """The engine's URL as libpq takes it (psycopg's own connections, outside the pool)."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


class _PostgresListener(Listener):
    """LISTEN on a dedicated autocommit connection; reconnects with backoff."""

    def __init__(self, conninfo: str) -> None:
        self._connection = OwnConnection(
            conninfo,
            name="doorbell listen",
            setup=f"LISTEN {CHANNEL}",
            failures=metrics.DOORBELL.labels("listen_error"),
        )

    def wait(self, timeout: float) -> bool:
        import psycopg  # the postgres extra; only a PostgreSQL deployment gets here

        connection = self._connection.get(psycopg)
        if connection is None:
            time.sleep(timeout)
            return False
        try:
            rung = False
            for _ in connection.notifies(timeout=timeout, stop_after=1):
                rung = True
            return rung
        except psycopg.Error as exc:
            self._connection.lost(exc)
            return False

    def close(self) -> None:
        self._connection.close()


class OwnConnection:
    """A dedicated autocommit psycopg connection of this process, made on first use and
    again after a failure, with backoff (0.5 s doubling to 30 s) between attempts.

    ``name`` is what ``pg_stat_activity`` shows (an operator counting connections) and
    what the logs say; ``setup`` runs on each new connection (a ``LISTEN``);
    ``failures`` counts each failure."""

    def __init__(
        self,
        conninfo: str,
        *,
        name: str,
        setup: str | None = None,
        failures: Any = None,
    ) -> None:
        self.conninfo = conninfo
        self._name = name
        self._setup = setup
        self._failures_metric = failures
        self._connection: Any = None
        self._pid = os.getpid()
        self._failures = 0
        self._next_attempt = 0.0

    def get(self, psycopg: Any) -> Any:
        """The connection, or None while it cannot be made (backing off)."""
        if self._pid != os.getpid():  # a fork's copy: the parent's socket is not ours
            self._connection, self._pid = None, os.getpid()
        if self._connection is not None:
            return self._connection
        if time.monotonic() < self._next_attempt:
            return None
        try:
            connection = psycopg.connect(
                self.conninfo,
                autocommit=True,
                connect_timeout=5,
                application_name=f"workerlease {self._name}",
            )
            if self._setup:
                connection.execute(self._setup)
        except psycopg.Error as exc:
            self.lost(exc)
            return None
        if self._failures:
            log.info("%s_reconnected after=%d failures", self._event, self._failures)
        self._failures = 0
        self._connection = connection
        return connection

    def lost(self, exc: Exception) -> None:
        """The connection failed: closed, made again after the backoff."""
        self.close()
        self._failures += 1
        backoff = min(RECONNECT_MAX_S, 0.5 * 2 ** min(self._failures, 10))
        self._next_attempt = time.monotonic() + backoff
        if self._failures_metric is not None:
            self._failures_metric.inc()
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        log.log(level, "%s_failed error=%s retry_in=%.1fs", self._event, exc, backoff)

    @property
    def _event(self) -> str:
        return self._name.replace(" ", "_")

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # closing a broken connection is best effort
                log.debug("doorbell_close_failed", exc_info=True)
