"""Requests that wait for something another request or process will do.

Lease requests with ``wait_seconds`` wait for their pending lease to leave
``pending``; agents wait (long poll) for their worker's next task; tenants
following a log wait for more output. A waiting request holds no transaction
and no database connection, and under the gevent server only a greenlet, so
thousands can wait at once. A change in this process (an agent's ready
callback, a task submitted, a log chunk stored) wakes the waiters of that key
directly, and, given a relay (``service.wakes``: PostgreSQL), the waiters of the other
web processes and replicas too. A change not relayed (SQLite's second web process, a
relay's connection down) is seen
by one poll per :class:`Waiters`: every ``recheck_s`` it asks the database
about all the keys waited on in one query, so its cost follows the distinct
keys waited on, not requests times checks (2,000 waiters re-reading their own
lease every 0.5 s would be 4,000 transactions a second).

An owner (a tenant, a worker) may hold at most ``per_owner`` waiting requests in a
process; beyond that the request is refused with 429 instead of taking capacity
from everyone else.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import prometheus_client

from service import metrics
from service.errors import TooManyRequests
from service.wakes import NoRelay, Relay

log = logging.getLogger("workerlease.waiters")

RECHECK_S = 0.5


@dataclass(frozen=True)
class WaitMetrics:
    waiting: prometheus_client.Gauge
    refused: prometheus_client.Counter
    poll_errors: prometheus_client.Counter


LEASE_WAIT_METRICS = WaitMetrics(metrics.WAITING, metrics.WAITS_REFUSED, metrics.WAITER_POLL_ERRORS)


class Waiters:
    """Requests waiting on keys; see the module's docstring."""

    def __init__(
        self,
        settled: Callable[[Collection[str]], Collection[str]],
        *,
        recheck_s: float = RECHECK_S,
        per_owner: int = 16,
        what: str = "requests",
        wait_metrics: WaitMetrics = LEASE_WAIT_METRICS,
        relay: Relay | None = None,
        topic: str = "lease",
    ) -> None:
        """``settled(keys)``: the keys among ``keys`` whose waiters should wake now.
        ``relay``: where this process's wakes of ``topic`` go to, and others' come from."""
        self._settled = settled
        self._recheck_s = recheck_s
        self._per_tenant = per_owner
        self._what = what
        self._metrics = wait_metrics
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self._handed: dict[str, object] = {}  # key -> what its waiters were handed
        self._waiting_on: Counter[str] = Counter()  # lease id -> requests waiting
        self._waiting = 0  # requests waiting, all leases
        self._by_tenant: Counter[str] = Counter()
        self._poller: threading.Thread | None = None
        self._draining = False
        self._relay = relay or NoRelay()
        self._topic = topic
        self._relay.subscribe(topic, self._woken_elsewhere)
        _ALL.add(self)

    def drain(self) -> None:
        """The process is stopping: wake every waiter now, and let nobody wait again."""
        with self._lock:
            self._draining = True
            for event in self._events.values():
                event.set()

    @property
    def draining(self) -> bool:
        return self._draining

    @contextmanager
    def slot(self, tenant_id: str) -> Iterator[None]:
        """One of the owner's waiting requests, taken before the request does anything,
        so a refusal (429) has no side effects."""
        with self._lock:
            if self._by_tenant[tenant_id] >= self._per_tenant:
                self._metrics.refused.inc()
                raise TooManyRequests(
                    f"at most {self._per_tenant} {self._what} may wait at once; "
                    "retry later, or ask again without wait_seconds",
                    retry_after=2,
                )
            self._by_tenant[tenant_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._by_tenant[tenant_id] -= 1
                if self._by_tenant[tenant_id] <= 0:
                    del self._by_tenant[tenant_id]

    def wait(self, lease_id: str, timeout_s: float) -> bool:
        """Wait until the key settles (True) or ``timeout_s`` passes (False)."""
        with self.watch(lease_id) as event:
            return event.wait(timeout_s)

    @contextmanager
    def watch(self, key: str) -> Iterator[threading.Event]:
        """Register as a waiter of ``key`` *before* looking at the state, then wait on the
        event: a notify between the look and the wait is not lost."""
        event = self._enter(key)
        try:
            yield event
        finally:
            self._leave(key)

    def notify(self, lease_ids: Collection[str]) -> None:
        """These keys changed (committed): wake whoever waits for them, here and in the
        processes the relay reaches."""
        self._wake(lease_ids)
        self._relay.publish(self._topic, lease_ids)

    def _wake(self, keys: Collection[str]) -> None:
        with self._lock:
            for key in keys:
                event = self._events.get(key)
                if event is not None:
                    event.set()

    def hand(self, key: str, value: object) -> None:
        """Give the waiters of ``key`` (if any) ``value`` and wake them; :meth:`handed`
        reads it until the key's last waiter leaves. Saves each woken waiter a read of
        what the writer already holds (a log chunk for the followers at its offset).
        This process only: a ``notify`` after it wakes the other processes' waiters."""
        with self._lock:
            event = self._events.get(key)
            if event is not None:
                self._handed[key] = value
                event.set()

    def handed(self, key: str) -> object | None:
        """What :meth:`hand` gave the waiters of ``key``, while one of them still waits."""
        with self._lock:
            return self._handed.get(key)

    def notify_prefix(self, prefix: str) -> None:
        """Wake the waiters of every key that starts with ``prefix``, here and in the
        processes the relay reaches."""
        self._wake_prefixes([prefix])
        self._relay.publish(self._topic, [prefix], prefix=True)

    def _wake_prefixes(self, prefixes: Collection[str]) -> None:
        with self._lock:
            for key, event in self._events.items():
                if key.startswith(tuple(prefixes)):
                    event.set()

    def _woken_elsewhere(self, keys: list[str], prefix: bool) -> None:
        """Another process notified: these waiters read again (a ``hand``ed value
        stays in the process that had it; the others' waiters read what it committed)."""
        if prefix:
            self._wake_prefixes(keys)
        else:
            self._wake(keys)

    def waiting(self) -> int:
        with self._lock:
            return self._waiting

    def _enter(self, lease_id: str) -> threading.Event:
        self._relay.listen()
        with self._lock:
            self._waiting_on[lease_id] += 1
            self._waiting += 1
            event = self._events.setdefault(lease_id, threading.Event())
            if self._draining:
                event.set()
            if self._poller is None:
                self._poller = threading.Thread(target=self._poll, name="waiters", daemon=True)
                self._poller.start()
            self._metrics.waiting.set(self._waiting)
            return event

    def _leave(self, lease_id: str) -> None:
        with self._lock:
            self._waiting_on[lease_id] -= 1
            self._waiting -= 1
            if self._waiting_on[lease_id] <= 0:
                del self._waiting_on[lease_id]
                self._events.pop(lease_id, None)
                self._handed.pop(lease_id, None)
            self._metrics.waiting.set(self._waiting)

    def _poll(self) -> None:
        """Re-read the waited-on leases until nobody waits; then stop (started again on need)."""
        while True:
            time.sleep(self._recheck_s)
            with self._lock:
                ids = [lease_id for lease_id, event in self._events.items() if not event.is_set()]
                if not self._events:
                    self._poller = None
                    return
            if not ids:
                continue
            try:
                done = self._settled(ids)
            except Exception:  # the database may be down: waiters time out, nothing crashes
                self._metrics.poll_errors.inc()
                log.warning(
                    "waiters_poll_failed what=%s waiting=%d",
                    self._what.replace(" ", "_"),
                    len(ids),
                    exc_info=True,
                )
                continue
            self._wake(done)  # each process reads for its own waiters: nothing to relay


_ALL: weakref.WeakSet[Waiters] = weakref.WeakSet()


def drain_all() -> None:
    """Every wait of this process ends now and new ones do not wait: a graceful stop
    answers long polls at once (as if they timed out) instead of sitting them out."""
    for waiters in list(_ALL):
        waiters.drain()


def lease_waiters(
    settled: Callable[[Collection[str]], Collection[str]],
    *,
    per_tenant: int = 16,
    relay: Relay | None = None,
) -> Waiters:
    """Lease requests waiting (``wait_seconds``) for their pending lease to settle."""
    return Waiters(settled, per_owner=per_tenant, what="lease requests of one tenant", relay=relay)
