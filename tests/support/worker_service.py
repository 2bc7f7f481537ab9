"""A fake of the service's worker protocol (docs/tasks.md, "Worker protocol"), and a
way to run the real agent against it.

``FakeWorkerService`` answers the ready callback (with a worker token), long polls,
log chunks by offset and finishes, as the service does, on 127.0.0.1. Tests queue tasks
with ``submit``, cancel them, and make faults happen: 503s before or after a chunk is
stored (the answer lost), a chunk refused, the whole server down for a while and back
on the same port, a finished task handed out again.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

AGENT = Path(__file__).resolve().parents[2] / "images" / "agent" / "workerlease_agent.py"
PYTHON = os.environ.get("WORKERLEASE_AGENT_TEST_PYTHON") or sys.executable
WORKER_TOKEN = "wlw_fake-worker-secret-51d2"
ACCESS_TOKEN = "wla_fake-access-secret-7c0e"
BOOTSTRAP_TOKEN = "wlb_fake-bootstrap-secret-93aa"
# Bounds a hang only: on an idle machine every wait below ends in well under a second.
WAIT_S = 60.0
_ids = itertools.count(1)


class _Down(Exception):
    """The fake is stopped: the connection is dropped without an answer."""


@dataclass
class FakeTask:
    id: str
    spec: dict[str, Any]
    state: str = "queued"  # queued -> running -> ended
    log: bytearray = field(default_factory=bytearray)
    cancel_requested: bool = False
    discarded: bool = False
    deliveries: int = 0
    finishes: list[dict[str, Any]] = field(default_factory=list)
    finish_statuses: list[int] = field(default_factory=list)
    log_calls: int = 0

    @property
    def result(self) -> dict[str, Any]:
        return self.finishes[-1]


@dataclass
class FakeWorkerService:
    worker_id: str = "w-fake"
    give_worker_token: bool = True
    log_limit: int | None = None  # the service's task_log_limit: beyond it, discard
    # Faults, each consumed by the next call it applies to.
    fail_logs: int = 0  # 503 before storing
    lose_log_answers: int = 0  # store, then 503 (the answer is lost)
    refuse_logs: int = 0  # 400: the chunk is not taken
    poll_statuses: list[int] = field(default_factory=list)
    poll_cancels: bool = True  # False: a cancel reaches the agent through log answers only
    # The longest a poll is held (the service holds one up to 30 s). A redelivered task
    # reaches the agent only at its next poll: a test of that shortens the wait.
    max_poll_wait_s: float = 30.0
    port: int = 0
    polls: list[list[str]] = field(default_factory=list)  # each poll's ``running``
    ready_calls: int = 0
    auth_failures: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)
    tasks: dict[str, FakeTask] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None
    _down: bool = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- running ---------------------------------------------------------------

    def start(self) -> FakeWorkerService:
        """Listen (again, on the same port after ``stop``)."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                try:
                    status, payload, content_type = fake._route(
                        self.path, self.headers.get("Authorization", ""), body
                    )
                except _Down:
                    self.close_connection = True
                    return
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.close_connection = True
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        with self.cond:
            self._down = False
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening; calls waiting in a long poll are dropped unanswered."""
        with self.cond:
            self._down = True
            self.cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- what tests do -----------------------------------------------------------

    def submit(self, script: str, **fields: Any) -> str:
        task_id = f"t-{next(_ids):04d}-{os.getpid()}"
        spec = {"id": task_id, "script": script, "shell": "sh", "timeout_s": 600, **fields}
        with self.cond:
            self.tasks[task_id] = FakeTask(task_id, spec)
            self.cond.notify_all()
        return task_id

    def cancel(self, task_id: str) -> None:
        with self.cond:
            self.tasks[task_id].cancel_requested = True
            self.cond.notify_all()

    def redeliver(self, task_id: str) -> None:
        """The service has the ended task as running again (its finish got lost)."""
        with self.cond:
            self.tasks[task_id].state = "running"
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"condition not met within {timeout}s")

    def wait_ended(self, task_id: str, timeout: float = WAIT_S) -> FakeTask:
        task = self.tasks[task_id]
        self.wait_for(lambda: task.state == "ended", timeout)
        return task

    def wait_log(self, task_id: str, needle: bytes, timeout: float = WAIT_S) -> None:
        task = self.tasks[task_id]
        self.wait_for(lambda: needle in task.log, timeout)

    # -- the protocol --------------------------------------------------------------

    def _route(self, target: str, auth: str, body: bytes) -> tuple[int, Any, str]:
        url = urlsplit(target)
        parts = url.path.strip("/").split("/")
        if len(parts) < 4 or parts[:3] != ["v1", "workers", self.worker_id]:
            return 404, {"title": "not found"}, "application/problem+json"
        if parts[3] == "ready":
            with self.cond:
                self.ready_calls += 1
            answer = {"access_token": ACCESS_TOKEN}
            if self.give_worker_token:
                answer["worker_token"] = WORKER_TOKEN
            return 200, answer, "application/json"
        if auth != f"Bearer {WORKER_TOKEN}":
            with self.cond:
                self.auth_failures += 1
            return 401, {"title": "unauthorized"}, "application/problem+json"
        if parts[3:] == ["poll"]:
            return self._poll(json.loads(body))
        if len(parts) == 6 and parts[3] == "tasks" and parts[5] in ("log", "finish"):
            task = self.tasks.get(parts[4])
            if task is None:
                return 404, {"title": "no such task"}, "application/problem+json"
            if parts[5] == "log":
                offset = int(parse_qs(url.query)["offset"][0])
                return self._log(task, offset, body)
            return self._finish(task, json.loads(body))
        return 404, {"title": "not found"}, "application/problem+json"

    def _poll(self, body: dict[str, Any]) -> tuple[int, Any, str]:
        running = list(body.get("running", []))
        started, wait = time.monotonic(), float(body.get("wait_seconds", 20))
        with self.cond:
            if self._down:
                raise _Down
            self.polls.append(running)
            self.cond.notify_all()  # a test may be waiting for the poll to arrive
            if self.poll_statuses:
                return self.poll_statuses.pop(0), {"title": "fault"}, "application/problem+json"
            while True:
                handout = [
                    t
                    for t in self.tasks.values()
                    if t.state == "queued" or (t.state == "running" and t.id not in running)
                ]
                cancel = [
                    tid
                    for tid in running
                    if self.poll_cancels
                    and (
                        tid not in self.tasks
                        or self.tasks[tid].cancel_requested
                        or self.tasks[tid].state == "ended"
                    )
                ]
                remaining = started + min(wait, self.max_poll_wait_s) - time.monotonic()
                if handout or cancel or remaining <= 0:
                    break
                self.cond.wait(remaining)
                if self._down:
                    raise _Down
            for task in handout:
                task.state = "running"
                task.deliveries += 1
            self.cond.notify_all()
            return 200, {"tasks": [t.spec for t in handout], "cancel": cancel}, "application/json"

    def _log(self, task: FakeTask, offset: int, data: bytes) -> tuple[int, Any, str]:
        with self.cond:
            if self._down:
                raise _Down
            task.log_calls += 1
            if self.fail_logs:
                self.fail_logs -= 1
                return 503, {"title": "busy"}, "application/problem+json"
            if self.refuse_logs:
                self.refuse_logs -= 1
                return 400, {"title": "refused"}, "application/problem+json"
            held = len(task.log)
            if offset <= held and not task.discarded:
                new = data[held - offset :]
                if self.log_limit is not None and held + len(new) > self.log_limit:
                    new = new[: self.log_limit - held]
                    task.discarded = True
                task.log += new
            self.cond.notify_all()
            if self.lose_log_answers:
                self.lose_log_answers -= 1
                return 503, {"title": "answer lost"}, "application/problem+json"
            answer = {
                "received": len(task.log),
                "cancel": task.cancel_requested or task.state == "ended",
                "discard": task.discarded,
            }
            return 200, answer, "application/json"

    def _finish(self, task: FakeTask, body: dict[str, Any]) -> tuple[int, Any, str]:
        with self.cond:
            if self._down:
                raise _Down
            task.finishes.append(body)
            if not task.discarded and len(task.log) < body["log_bytes"]:
                task.finish_statuses.append(409)
                problem = {"title": "log incomplete", "received": len(task.log)}
                return 409, problem, "application/problem+json"
            task.finish_statuses.append(200)
            task.state = "ended"
            self.cond.notify_all()
            return 200, {"state": body["outcome"]}, "application/json"


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(WAIT_S)


def start_agent(fake: FakeWorkerService, workdir: Path, **env: str) -> AgentProcess:
    """The real agent, in its own session, against ``fake``; returns once it is ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "agent.log"
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TMPDIR": str(workdir),
        "WORKERLEASE_URL": fake.url,
        "WORKERLEASE_WORKER_ID": fake.worker_id,
        "WORKERLEASE_BOOTSTRAP_TOKEN": BOOTSTRAP_TOKEN,
        "WORKERLEASE_AGENT_PORT": "0",
        **env,
    }
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [PYTHON, str(AGENT)],
            cwd=workdir,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    agent = AgentProcess(proc, log_path)
    deadline = time.monotonic() + WAIT_S
    while "event=ready " not in agent.log():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"agent not ready:\n{agent.log()}")
        time.sleep(0.05)
    return agent
