"""Requests that wait (``wait_seconds``) for their pending lease to leave ``pending``.

A waiting request holds no transaction and no database connection, and under the
gevent server only a greenlet, so thousands can wait at once. Activation in this
process (an agent's ready callback, the queue served at once) wakes the waiters of
those leases directly. Activation elsewhere (another replica, the scheduler
process) is seen by one poll per process: every ``recheck_s`` it reads all the
leases waited on in one query, so its cost follows the distinct leases waited
on, not requests times checks (2,000 waiters re-reading their own lease every
0.5 s would be 4,000 transactions a second).

A tenant may hold at most ``per_tenant`` waiting requests in a process; beyond that
the request is refused with 429 instead of taking capacity from everyone else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager

from service import metrics
from service.errors import TooManyRequests

log = logging.getLogger("workerlease.waiters")

RECHECK_S = 0.5


class LeaseWaiters:
    def __init__(
        self,
        settled: Callable[[Collection[str]], Collection[str]],
        *,
        recheck_s: float = RECHECK_S,
        per_tenant: int = 16,
    ) -> None:
        """``settled(ids)``: the leases among ``ids`` that are no longer pending."""
        self._settled = settled
        self._recheck_s = recheck_s
        self._per_tenant = per_tenant
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self._waiting_on: Counter[str] = Counter()  # lease id -> requests waiting
        self._waiting = 0  # requests waiting, all leases
        self._by_tenant: Counter[str] = Counter()
        self._poller: threading.Thread | None = None

    @contextmanager
    def slot(self, tenant_id: str) -> Iterator[None]:
        """One of the tenant's waiting requests, taken before the request does anything,
        so a refusal (429) has no side effects."""
        with self._lock:
            if self._by_tenant[tenant_id] >= self._per_tenant:
                metrics.WAITS_REFUSED.inc()
                raise TooManyRequests(
                    f"at most {self._per_tenant} requests of one tenant may wait at once; "
                    "retry later, or request without wait_seconds and poll the lease",
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
        """Wait until the lease settles (True) or ``timeout_s`` passes (False)."""
        event = self._enter(lease_id)
        try:
            return event.wait(timeout_s)
        finally:
            self._leave(lease_id)

    def notify(self, lease_ids: Collection[str]) -> None:
        """These leases left ``pending``: wake whoever waits for them."""
        with self._lock:
            for lease_id in lease_ids:
                event = self._events.get(lease_id)
                if event is not None:
                    event.set()

    def waiting(self) -> int:
        with self._lock:
            return self._waiting

    def _enter(self, lease_id: str) -> threading.Event:
        with self._lock:
            self._waiting_on[lease_id] += 1
            self._waiting += 1
            event = self._events.setdefault(lease_id, threading.Event())
            if self._poller is None:
                self._poller = threading.Thread(
                    target=self._poll, name="lease-waiters", daemon=True
                )
                self._poller.start()
            metrics.WAITING.set(self._waiting)
            return event

    def _leave(self, lease_id: str) -> None:
        with self._lock:
            self._waiting_on[lease_id] -= 1
            self._waiting -= 1
            if self._waiting_on[lease_id] <= 0:
                del self._waiting_on[lease_id]
                self._events.pop(lease_id, None)
            metrics.WAITING.set(self._waiting)

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
                metrics.WAITER_POLL_ERRORS.inc()
                log.warning("lease_waiters_poll_failed waiting=%d", len(ids), exc_info=True)
                continue
            self.notify(done)
