"""The web worker: gunicorn's gevent worker that ends long polls when it is told to stop.

A graceful stop waits for requests in flight. Agents hold a task poll open (20 s)
and tenants may wait on a lease or a log (up to 60 s), so without this every stop
or rolling restart would sit those out, and a supervisor would SIGKILL the worker
first. On SIGTERM each wait is answered at once, as if it had timed out; clients
poll again, and reach another worker or the restarted one.
"""

from __future__ import annotations

from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventWorker

from service.waiters import drain_all


class DrainingGeventWorker(GeventWorker):
    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # Not in the signal handler itself: waking greenlets from there is not safe.
        gevent.spawn(drain_all)
