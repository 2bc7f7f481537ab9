"""The web worker: gunicorn's gevent worker that ends long polls when it is told to stop.

A graceful stop waits for requests in flight. Agents hold a task poll open (20 s)
and tenants may wait on a lease or a log (up to 60 s), so without this every stop
or rolling restart would sit those out, and a supervisor would SIGKILL the worker
first. On SIGTERM each wait is answered at once, as if it had timed out; clients
poll again, and reach another worker or the restarted one.

Connections kept alive between requests are closed on SIGTERM too: gunicorn counts
them as busy and waits for the keep-alive timeout (5 s) before the worker may exit,
so every stop took 5.5 s while any client held one open.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import socket
import termios
from types import TracebackType
from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventWorker

from service.waiters import drain_all


class DrainingGeventWorker(GeventWorker):
    def init_process(self) -> None:
        self._clients: dict[Any, socket.socket] = {}  # greenlet -> the connection it serves
        # the same, for connections waiting for their next request
        self._between_requests: dict[Any, socket.socket] = {}
        super().init_process()

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        current = gevent.getcurrent()
        self._clients[current] = client
        try:
            super().handle(listener, client, addr)
        finally:
            del self._clients[current]

    def timeout_ctx(self) -> Any:
        """gunicorn reads each request's headers under this; it marks the wait."""
        client = self._clients[gevent.getcurrent()]
        return _BetweenRequests(self._between_requests, client, super().timeout_ctx())

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # Not in the signal handler itself: waking greenlets from there is not safe.
        gevent.spawn(self._drain)

    def _drain(self) -> None:
        drain_all()
        for client in list(self._between_requests.values()):
            # A request already arriving is read and answered (with Connection: close,
            # as gunicorn does once the worker stops); an idle connection is ended.
            if _unread_bytes(client) == 0:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)


class _BetweenRequests:
    """The keep-alive wait for a connection's next request, registered while it lasts."""

    def __init__(self, waiting: dict[Any, socket.socket], client: socket.socket, timeout: Any):
        self._waiting = waiting
        self._client = client
        self._timeout = timeout

    def __enter__(self) -> Any:
        self._waiting[gevent.getcurrent()] = self._client
        return self._timeout.__enter__()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self._waiting.pop(gevent.getcurrent(), None)
        return bool(self._timeout.__exit__(kind, value, traceback))


def _unread_bytes(client: socket.socket) -> int:
    """Bytes received and not yet read (FIONREAD: never blocks, never consumes)."""
    count = array.array("i", [0])
    try:
        fcntl.ioctl(client.fileno(), termios.FIONREAD, count, True)
    except OSError:
        return 0
    return count[0]
