"""Retries over real sockets, against a small scripted HTTP server: ``Retry-After`` is
waited for, a broken connection repeats only what is safe to repeat, and a task POST
whose connection broke after it was sent is never sent again."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from workerlease_client import Client, ConnectionFailed, Retry

# What the server does with the n-th request to a path: ("answer", status, headers, body)
# or ("drop",): read the request, then close the connection without a word.
Step = tuple[Any, ...]


class Scripted(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: dict[tuple[str, str], list[Step]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script = script
        self.seen: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def times(self, method: str, path: str) -> list[float]:
        return [at for at, m, p in self.seen if (m, p) == (method, path)]


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
            steps = self.server.script.get((self.command, path)) or [("answer", 404, {}, {})]
            step = steps.pop(0) if len(steps) > 1 else steps[0]
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
