"""Retries over real sockets, against a small scripted HTTP server: ``Retry-After`` is
waited for, a broken connection repeats only what is safe to repeat, and a task POST
whose connection broke after it was sent is never sent again."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from workerlease_client import Client, ConnectionFailed, Retry

# What the server does with the n-th request to a path: ("answer", status, headers, body),
# ("drop",): read the request, then close the connection without a word, or ("hang",):
# read it and answer nothing until the test ends.
Step = tuple[Any, ...]


class Scripted(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: dict[tuple[str, str], list[Step]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script = script
        self.seen: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.hung = threading.Event()  # set when the test ends: hanging requests end

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def times(self, method: str, path: str) -> list[float]:
        return [at for at, m, p in self.seen if (m, p) == (method, path)]

    def wait_for(self, method: str, path: str, timeout: float = 60) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: self.times(method, path), timeout)


class _Handler(BaseHTTPRequestHandler):
    server: Scripted
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        path = self.path.split("?")[0]
        with self.server.lock:
            self.server.seen.append((time.monotonic(), self.command, path))
            self.server.arrived.notify_all()
            steps = self.server.script.get((self.command, path)) or [("answer", 404, {}, {})]
            step = steps.pop(0) if len(steps) > 1 else steps[0]
        if step[0] == "hang":
            self.server.hung.wait(300)
            step = ("drop",)
        if step[0] == "drop":
            self.close_connection = True
            self.connection.close()
            return
        _, status, headers, body = step
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _serve


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[Scripted] = []

    def start(script: dict[tuple[str, str], list[Step]]) -> Scripted:
        server = Scripted(script)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.hung.set()
        server.shutdown()
        server.server_close()


LEASE = {"id": "l-0000000000000000000a", "pool": "p", "state": "active", "worker": None}
TASK = {"id": "t-0000000000000000000b", "lease_id": LEASE["id"], "state": "queued"}
TASKS = f"/v1/leases/{LEASE['id']}/tasks"


def problem(status: int, retry_after: int) -> Step:
    body = {"type": "about:blank", "status": status, "title": "Busy", "detail": "retry later"}
    return ("answer", status, {"Retry-After": str(retry_after)}, body)


def test_task_post_waits_retry_after_and_is_not_repeated_after_a_broken_connection(
    serve: Any,
) -> None:
    server = serve({("POST", TASKS): [problem(429, 1), ("drop",), ("answer", 201, {}, TASK)]})
    client = Client(server.url, "wlt_x", retry=Retry(attempts=5))
    with client, pytest.raises(ConnectionFailed, match="not repeated"):
        client.submit_task(LEASE["id"], "echo once")
    first, second = server.times("POST", TASKS)  # exactly two: the 429, then the one dropped
    assert second - first >= 1.0


def test_safe_calls_are_retried_over_broken_connections_and_503(serve: Any) -> None:
    server = serve(
        {
            ("GET", "/v1/pools"): [("drop",), problem(503, 1), ("answer", 200, {}, {"pools": []})],
            ("POST", "/v1/leases"): [("drop",), ("answer", 200, {}, LEASE)],
        }
    )
    with Client(server.url, "wlt_x", retry=Retry(attempts=5, base=0.05)) as client:
        assert client.pools() == []
        lease = client.request_lease("p")
    times = server.times("GET", "/v1/pools")
    assert len(times) == 3 and times[2] - times[1] >= 1.0
    assert len(server.times("POST", "/v1/leases")) == 2 and lease.existing


def test_a_service_that_is_not_there_is_a_connection_error_after_the_retries() -> None:
    client = Client("http://127.0.0.1:9", "wlt_x", retry=Retry(attempts=2, base=0.01))
    with client, pytest.raises(ConnectionFailed):
        client.pools()


# The renew in flight meets the client closed under it: its thread must end quietly.
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_ctrl_c_cancels_and_releases_at_once_while_a_renew_and_the_log_poll_hang(
    serve: Any,
) -> None:
    """Ctrl-C while following a log: the cancel and the release go out on a fresh
    connection at once, not after the renew in flight (which never answers) gives up."""
    soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    lease = {**LEASE, "idle_expires_at": soon}
    renew, log = f"/v1/leases/{LEASE['id']}/renew", f"{TASKS}/{TASK['id']}/log"
    cancel, release = f"{TASKS}/{TASK['id']}/cancel", f"/v1/leases/{LEASE['id']}"
    server = serve(
        {
            ("POST", "/v1/leases"): [("answer", 201, {}, lease)],
            ("POST", renew): [("hang",)],
            ("POST", TASKS): [("answer", 201, {}, TASK)],
            ("GET", log): [("hang",)],
            ("POST", cancel): [("answer", 202, {}, {**TASK, "state": "cancelled"})],
            ("DELETE", release): [("answer", 200, {}, {**LEASE, "state": "released"})],
        }
    )
    main = threading.get_ident()

    def press_ctrl_c() -> None:
        server.wait_for("POST", renew)
        server.wait_for("GET", log)
        signal.pthread_kill(main, signal.SIGINT)

    # A suite started in the background may have SIGINT ignored; Ctrl-C is the point here.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), Client(server.url, "wlt_x") as client:
            threading.Thread(target=press_ctrl_c, daemon=True).start()
            with client.lease("p", wait=10) as held:
                held.run("sleep 600")
    finally:
        signal.signal(signal.SIGINT, previous)
    pressed = server.times("GET", log)[0]
    (cancelled,) = server.times("POST", cancel)
    (released,) = server.times("DELETE", release)
    # The renew hangs for its whole 30 s read timeout; the old renewer join waited 60 s.
    assert pressed < cancelled < released < pressed + 25
