"""Request ids and JSON logs on a real ``serve`` (gunicorn's gevent worker).

Waiting lease requests run side by side in one web process, each in its own greenlet,
and log as they start and end their wait; every line a request logs, its access line
included, must carry that request's id and no other (a context variable is per
greenlet under gevent: shared, the ids would cross). ``log_format: json`` turns every
line of every process (gunicorn's master and workers, the scheduler) into JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.server import ServerProcess, pool, wait_until

pytestmark = pytest.mark.integration

POOL = "hosted-ubuntu"
REQUESTS = 4


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(
        tmp_path, pools=[pool(min_ready=0, max_workers=REQUESTS)], extra={"log_format": "json"}
    )
    try:
        yield process.start()
    finally:
        process.close()


def _lines(server: ServerProcess) -> list[dict[str, Any]]:
    text = server.log_path.read_text(errors="replace")
    lines = []
    for raw in text.splitlines():
        if raw.strip() and not raw.startswith("===== start"):  # the harness's marker
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                pytest.fail(f"not a JSON line: {raw!r}")
    return lines


def test_each_waiting_request_logs_under_its_own_id(server: ServerProcess) -> None:
    tokens = [server.create_tenant(f"t{i}")["token"] for i in range(REQUESTS)]

    def lease(i: int) -> tuple[str, str]:
        response = server.request(
            "POST",
            "/v1/leases",
            token=tokens[i],
            json={"pool": POOL, "wait_seconds": 60},
            headers={"X-Request-Id": f"it-request-{i}"},
            timeout=90,
        )
        assert response.status_code in (201, 202), response.text
        assert response.headers["X-Request-Id"] == f"it-request-{i}"
        return f"it-request-{i}", response.json()["id"]

    with ThreadPoolExecutor(REQUESTS) as pool_:
        leases = dict(pool_.map(lease, range(REQUESTS)))

    def logged() -> list[dict[str, Any]]:
        return [line for line in _lines(server) if line.get("lease") in leases.values()]

    # Each request waited (no worker was warm) while the others did: both lines each.
    wait_until(
        lambda: len([x for x in logged() if x["event"] == "lease_wait_ended"]) == REQUESTS,
        30,
        message=lambda: server.log_tail(),
    )
    waits = [line for line in logged() if line["event"] in ("lease_waiting", "lease_wait_ended")]
    for line in waits:
        assert leases[line["request_id"]] == line["lease"], line
    # The waits overlapped in one process: several began before the first one ended.
    first_end = next(i for i, line in enumerate(waits) if line["event"] == "lease_wait_ended")
    assert len({(line["proc"], line["lease"]) for line in waits[:first_end]}) >= 2, waits

    def access() -> list[str]:
        return sorted(
            line["request_id"]
            for line in _lines(server)
            if line["event"] == "http_request" and line.get("path") == "/v1/leases"
        )

    # gunicorn writes the access line after the answer is sent: the client may be first.
    wait_until(lambda: len(access()) == REQUESTS, 30, message=lambda: server.log_tail())
    assert access() == sorted(leases)

    # An id the client did not send, or one that is not sane, is made by the service.
    response = server.request("GET", "/readyz", headers={"X-Request-Id": "x" * 300})
    made = response.headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    wait_until(
        lambda: any(line.get("request_id") == made for line in _lines(server)),
        10,
        message="the access line of /readyz has no request id",
    )


def test_json_lines_from_every_process(server: ServerProcess) -> None:
    server.request("GET", "/readyz")
    lines = _lines(server)  # fails on any line that is not JSON
    loggers = {line["logger"] for line in lines}
    assert "gunicorn.access" in loggers and "gunicorn.error" in loggers
    assert any(name.startswith("workerlease.scheduler") for name in loggers), loggers
    for line in lines:
        assert {"ts", "level", "logger", "proc", "event"} <= line.keys(), line
