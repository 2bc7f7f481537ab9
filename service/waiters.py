"""Wake requests that wait (``wait_seconds``) for their pending lease to become active.

Activation may happen in this process (the agent's callback) or in another
replica, so a waiter also re-reads the database at a modest interval. No
transaction is held while waiting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

RECHECK_S = 0.5


class LeaseWaiters:
    def __init__(self) -> None:
        self._changed = threading.Condition()

    def notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Return True as soon as ``done()`` holds, False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            if done():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._changed:
                self._changed.wait(min(remaining, RECHECK_S))
