"""The web worker: gunicorn's gevent worker that ends long polls when it is told to stop.

A graceful stop waits for requests in flight. Agents hold a task poll open (20 s)
and tenants may wait on a lease or a log (up to 60 s), so without this every stop
or rolling restart would sit those out, and a supervisor would SIGKILL the worker
first. On SIGTERM each wait is answered at once, as if it had timed out; clients
poll again, and reach another worker or the restarted one.

Connections kept alive between requests are closed on SIGTERM too: gunicorn counts
them as busy and waits for the keep-alive timeout (5 s) before the worker may exit,
so every stop took 5.5 s while any client held one open.

psycopg is made to wait cooperatively (``_cooperative_psycopg``): otherwise every
PostgreSQL round trip would block the whole process.

And the worker stops accepting at once. gunicorn's own loop notices a stop at its next
1 s tick; until then it accepted new connections, and every wait on them was answered
at once (draining), so an agent re-polled in a tight loop for that second (about 30
polls each) instead of moving to another worker or waiting for the restart.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import gc
import selectors
import socket
import sys
import termios
import time
from functools import partial
from types import TracebackType
from typing import Any

import gevent
import gevent.event
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import GeventWorker

from service.waiters import drain_all

# How often the stopping worker looks whether its last request has ended (gunicorn: 1 s).
STOP_CHECK_S = 0.1


class DrainingGeventWorker(GeventWorker):
    def init_process(self) -> None:
        self._clients: dict[Any, socket.socket] = {}  # greenlet -> the connection it serves
        # the same, for connections waiting for their next request
        self._between_requests: dict[Any, socket.socket] = {}
        self._servers: list[StreamServer] = []
        self._stopping = gevent.event.Event()
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        # What the app built at start lives as long as the process: move it out of the
        # collector's sight. Each full collection walked it again (130,000 objects):
        # 45-90 ms with the whole process stopped, the warm lease's worst tail in the
        # tasks benchmark; after the freeze 3-27 ms (docs/benchmarks.md, session 7).
        gc.collect()
        gc.freeze()

    def patch(self) -> None:
        super().patch()  # gevent's monkey patching, in the worker after the fork
        _cooperative_psycopg()

    def run(self) -> None:
        """gunicorn's ``GeventWorker.run`` (27.0, its ``StreamServer`` path), except that
        the stop is an event rather than a 1 s tick: ``_drain`` closes the listeners
        before it answers any wait, and the last request's end is seen within 0.1 s."""
        ssl_args = {"ssl_context": ssl_context(self.cfg)} if self.cfg.is_ssl else {}
        for sock in self.sockets:
            sock.setblocking(1)
            server = StreamServer(
                sock,
                handle=partial(self.handle, sock),
                spawn=Pool(self.worker_connections),
                **ssl_args,
            )
            if self.cfg.workers > 1:
                server.max_accept = 1
            server.start()
            self._servers.append(server)
        while self.alive:
            self.notify()
            self._stopping.wait(1.0)
        self._stop_accepting()
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while time.monotonic() < deadline:
            if all(server.pool.free_count() == server.pool.size for server in self._servers):
                return
            self.notify()
            gevent.sleep(STOP_CHECK_S)
        self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
        for server in self._servers:
            server.stop(timeout=1)

    def _stop_accepting(self) -> None:
        for server in self._servers:
            if not server.closed:
                server.close()

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
        self._stop_accepting()  # first: a wait answered below must not come back here
        self._stopping.set()
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


def _cooperative_psycopg() -> None:
    """psycopg chooses how it waits for the server when it is first imported: a loop in C
    that blocks the whole process, unless gevent had patched ``select`` by then. The
    gunicorn master imports it before the fork (it prepares the database), so each
    PostgreSQL round trip stalled every request of the worker. Choose again as psycopg
    does when imported after the patch: ``select.poll`` (gevent's now) for queries, and
    gevent's selector for connecting."""
    if "psycopg.waiting" not in sys.modules:
        return  # imported later, it sees the patch and chooses a cooperative wait itself
    from psycopg import waiting

    waiting.wait = waiting.wait_poll
    waiting.DefaultSelector = selectors.DefaultSelector  # type: ignore[misc]


def _unread_bytes(client: socket.socket) -> int:
    """Bytes received and not yet read (FIONREAD: never blocks, never consumes)."""
    count = array.array("i", [0])
    try:
        fcntl.ioctl(client.fileno(), termios.FIONREAD, count, True)
    except OSError:
        return 0
    return count[0]
