"""Doubles of the service for the client's unit tests: scripted ``httpx.MockTransport``
answers (``Recorder``, ``sequence``) and a small in-memory tenant API (``FakeService``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from workerlease_client import Client

URL = "http://wl.test"
Handler = Callable[[httpx.Request], httpx.Response]


def lease_json(
    state: str = "active", lease_id: str = "l-0000000000000000000a", **extra: Any
) -> Any:
    now = datetime.now(UTC)
    body = {
        "id": lease_id,
        "tenant_id": "t-00000000000000000001",
        "pool": "hosted-ubuntu",
        "state": state,
        "created_at": now.isoformat(),
        "activated_at": now.isoformat() if state == "active" else None,
        "idle_expires_at": (now + timedelta(hours=1)).isoformat() if state == "active" else None,
        "expires_at": None,
        "ended_at": None,
        "end_reason": None,
        "worker": None,
    }
    body.update(extra)
    return body


def task_json(state: str = "queued", exit_code: int | None = None) -> Any:
    return {
        "id": "t-0000000000000000000b",
        "lease_id": "l-0000000000000000000a",
        "state": state,
        "exit_code": exit_code,
        "error": None,
        "created_at": datetime.now(UTC).isoformat(),
        "started_at": None,
        "finished_at": None,
        "shell": "sh",
        "timeout_s": 3600,
        "container": None,
        "log_bytes": 0,
    }


def problem(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> httpx.Response:
    """A problem document answer; ``extra``: its extension members."""
    return httpx.Response(
        status,
        json={"type": "about:blank", "status": status, "title": title, "detail": detail, **extra},
        headers={"Content-Type": "application/problem+json", **(headers or {})},
    )


class Recorder:
    """A MockTransport whose answers are scripted per call; records the requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    def client(self, **kwargs: Any) -> Client:
        return Client(
            URL,
            "wlt_test",
            transport=httpx.MockTransport(self),
            sleep=self.sleeps.append,
            **kwargs,
        )

    def calls(self, method: str, path_part: str) -> int:
        return sum(1 for r in self.requests if r.method == method and path_part in r.url.path)


def sequence(*answers: httpx.Response | Exception) -> Handler:
    """Answer the n-th request with the n-th item (an exception is raised)."""
    items = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        item = items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    return handler


class FakeService:
    """Just enough of the tenant API, in memory, for lease and task flows."""

    def __init__(self, pending_polls: int = 0, log: bytes = b"out\n", exit_code: int = 0) -> None:
        self.pending_polls = pending_polls
        self.log = log
        self.exit_code = exit_code
        self.state = "none"
        self.task_state = "running"
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        with self.lock:
            if method == "POST" and path == "/v1/leases":
                self.state = "pending" if self.pending_polls else "active"
                return httpx.Response(
                    202 if self.pending_polls else 201, json=lease_json(self.state)
                )
            if method == "GET" and path.startswith("/v1/leases/") and path.count("/") == 3:
                if self.state == "pending" and self.pending_polls > 0:  # < 0: pending forever
                    self.pending_polls -= 1
                    if self.pending_polls <= 0:
                        self.state = "active"
                return httpx.Response(200, json=lease_json(self.state))
            if method == "DELETE":
                self.state = "released"
                return httpx.Response(200, json=lease_json("released"))
            if path.endswith("/renew"):
                if self.state != "active":
                    return problem(409, "Conflict", "lease has ended")
                return httpx.Response(200, json=lease_json())
            if method == "POST" and path.endswith("/tasks"):
                return httpx.Response(201, json=task_json("running"))
            if path.endswith("/cancel"):
                self.task_state = "cancelled"
                return httpx.Response(202, json=task_json("cancelled"))
            if path.endswith("/log"):
                offset = int(request.url.params["offset"])
                piece = self.log[offset:]
                done = self.task_state != "running" or not piece
                if done and self.task_state == "running":
                    self.task_state = "succeeded" if self.exit_code == 0 else "failed"
                return httpx.Response(
                    200,
                    content=piece,
                    headers={
                        "X-Next-Offset": str(offset + len(piece)),
                        "X-Task-State": self.task_state,
                    },
                )
            if method == "GET" and "/tasks/" in path:
                ended = self.task_state != "running"
                code = self.exit_code if self.task_state in ("succeeded", "failed") else None
                return httpx.Response(200, json=task_json(self.task_state, code if ended else None))
        return problem(404, "Not found", f"{method} {path}")
