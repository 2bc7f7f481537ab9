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
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

log = logging.getLogger("workerlease.dispatch")


class PoolDispatcher:
    def __init__(self, name: str, per_pool: int, max_threads: int = 64) -> None:
        self.name = name
        self.per_pool = per_pool
        self._executor = ThreadPoolExecutor(
            max_workers=max_threads, thread_name_prefix=f"{name}-call"
        )
        self._lock = threading.Lock()
        self._running: dict[str, set[str]] = defaultdict(set)  # pool -> keys in flight
        self._futures: set[Future[Any]] = set()

    def free_slots(self, pool: str) -> int:
        with self._lock:
            return max(0, self.per_pool - len(self._running[pool]))

    def in_flight(self, pool: str) -> set[str]:
        with self._lock:
            return set(self._running[pool])

    def submit(self, pool: str, key: str, call: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            self._running[pool].add(key)
            future = self._executor.submit(self._run, pool, key, call, *args)
            self._futures.add(future)
        future.add_done_callback(self._forget)

    def _run(self, pool: str, key: str, call: Callable[..., Any], *args: Any) -> None:
        try:
            call(*args)
        except Exception:  # the call records its own failures; this is a last resort
            log.exception("%s_call_failed pool=%s key=%s", self.name, pool, key)
        finally:
            with self._lock:
                self._running[pool].discard(key)

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for every call submitted so far; False when some are still running."""
        with self._lock:
            pending = set(self._futures)
        _, not_done = wait_futures(pending, timeout=timeout)
        return not not_done

    def shutdown(self, timeout: float = 30) -> None:
        if not self.wait(timeout):
            log.warning(
                "%s_calls_still_running at shutdown; leaving them to the next start", self.name
            )
        self._executor.shutdown(wait=False, cancel_futures=True)
