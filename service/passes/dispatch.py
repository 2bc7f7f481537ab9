"""Provisioner calls run in the background, bounded per pool.

A slow or hanging provisioner (a create that waits on a cloud API, a daemon that
stopped answering) must never hold up the scheduler's passes (expiry, health,
activation) or another pool's creates and destroys. The passes claim work in the
database and hand each call to a :class:`PoolDispatcher`, which runs at most
``per_pool`` calls of one pool at a time and remembers which worker ids are in
flight so the next pass does not start the same call again.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("workerlease.dispatch")


class PoolDispatcher:
    """Per-pool queues of provisioner calls, at most ``per_pool`` of a pool running at once.

    Queued calls wait in the dispatcher, not on executor threads, so a hanging pool
    holds at most ``per_pool`` threads and other pools keep going.
    """

    def __init__(
        self, name: str, per_pool: int, max_queued: int = 200, max_threads: int = 64
    ) -> None:
        self.name = name
        self.per_pool = per_pool
        self.max_queued = max_queued
        self._executor = ThreadPoolExecutor(
            max_workers=max_threads, thread_name_prefix=f"{name}-call"
        )
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queued: dict[str, deque[tuple[str, Callable[..., Any], tuple[Any, ...]]]] = (
            defaultdict(deque)
        )
        self._running: dict[str, set[str]] = defaultdict(set)
        self._keys: dict[str, set[str]] = defaultdict(set)  # queued or running, per pool

    def free_slots(self, pool: str) -> int:
        """How many more calls the pool may queue now."""
        with self._lock:
            return max(0, self.max_queued - len(self._keys[pool]))

    def in_flight(self, pool: str) -> set[str]:
        with self._lock:
            return set(self._keys[pool])

    def submit(self, pool: str, key: str, call: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            if key in self._keys[pool]:
                return
            self._keys[pool].add(key)
            self._queued[pool].append((key, call, args))
            self._pump(pool)

    def _pump(self, pool: str) -> None:
        """Start queued calls while the pool has room (called with the lock held)."""
        queue = self._queued[pool]
        while queue and len(self._running[pool]) < self.per_pool:
            key, call, args = queue.popleft()
            self._running[pool].add(key)
            self._executor.submit(self._run, pool, key, call, args)

    def _run(self, pool: str, key: str, call: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            call(*args)
        except Exception:  # the call records its own failures; this is a last resort
            log.exception("%s_call_failed pool=%s key=%s", self.name, pool, key)
        finally:
            with self._lock:
                self._running[pool].discard(key)
                self._keys[pool].discard(key)
                self._pump(pool)
                self._idle.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or running; False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: not any(self._keys.values()), timeout=timeout)

    def shutdown(self, timeout: float = 30) -> None:
        if not self.wait(timeout):
            log.warning(
                "%s_calls_still_running at shutdown; the next start picks them up", self.name
            )
        with self._lock:
            self._queued.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
