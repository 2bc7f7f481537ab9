"""A fake service that answers local agents' ready callbacks, and waiting helpers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

POOL = "pool-a"


class FakeService:
    """Answers ready callbacks with ``access-<worker id>``, or with ``status`` when set."""

    def __init__(self) -> None:
        self.calls: dict[str, list[dict[str, Any]]] = {}
        self.status = 200
        self._lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                worker_id = self.path.split("/")[3]
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with service._lock:
                    service.calls.setdefault(worker_id, []).append(body)
                payload = {"access_token": f"access-{worker_id}"}
                data = json.dumps(payload if service.status == 200 else {}).encode()
                self.send_response(service.status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def agent_url(self, worker_id: str) -> str:
        wait_for(lambda: worker_id in self.calls)
        return str(self.calls[worker_id][0]["agent_url"])

    def run(self, worker_id: str, script: str) -> dict[str, Any]:
        """Run ``script`` through the worker's agent. The callback is recorded before it
        is answered, so the agent may not hold its access token yet: 503 until it does."""
        url = f"{self.agent_url(worker_id)}/run"
        responses: list[requests.Response] = []

        def answered() -> bool:
            response = requests.post(
                url,
                json={"script": script, "timeout_s": 10},
                headers={"Authorization": f"Bearer access-{worker_id}"},
                timeout=30,
            )
            responses.append(response)
            return response.status_code != 503

        wait_for(answered)
        response = responses[-1]
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll until ``predicate()``; the timeout bounds a hang (an agent's start under load
    takes seconds, not the tenth of one it takes on an idle machine)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """True unless gone or a zombie (PID 1 on these machines may never reap orphans)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return False
    return fields[0] != "Z"
