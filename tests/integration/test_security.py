"""The security review's findings against a real ``workerlease serve`` (issue 10).

Local workers under uids of their own when the service is root (finding 1), slow
clients that never finish their headers (3), one tenant's many waiting requests (4).
Deadlines here only bound a stall: the old server (gthread, 32 threads) stalled for
the whole wait or the whole slow-client period, far past them.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.server import ServerProcess, pool, wait_until, worker_root

pytestmark = pytest.mark.integration

POOL = "hosted-ubuntu"


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    """A service whose own directory others can pass through (0711), so only the files'
    own modes protect the database and the key, as in a checkout under /srv or /opt."""
    home = worker_root("workerlease-sec-")
    # Without execution-containers: that capability gives workers the host engine (root).
    service = ServerProcess(home, pools=[pool(min_ready=2, max_workers=4, capabilities=[])])
    try:
        yield service.start()
    finally:
        service.close()
        shutil.rmtree(home, ignore_errors=True)


def _lease(server: ServerProcess, name: str) -> dict[str, Any]:
    token = server.create_tenant(name)["token"]
    answer = server.request(
        "POST", "/v1/leases", token=token, json={"pool": POOL, "wait_seconds": 60}, timeout=90
    )
    assert answer.status_code == 201, answer.text
    worker: dict[str, Any] = answer.json()["worker"]
    return worker


def _run(worker: dict[str, Any], script: str) -> dict[str, Any]:
    answer = requests.post(
        f"{worker['agent_url'].rstrip('/')}/run",
        json={"script": script, "timeout_s": 60},
        headers={"Authorization": f"Bearer {worker['access_token']}"},
        timeout=90,
    )
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def test_a_tenant_script_cannot_reach_the_service_or_another_tenants_worker(
    server: ServerProcess,
) -> None:
    assert os.geteuid() == 0, "workers get uids of their own only when the service is root"
    mine, theirs = _lease(server, "attacker"), _lease(server, "victim")
    victim_agent = server.agents()[theirs["id"]]
    serve_pid = server.process.pid if server.process else 0
    key = Path(f"{server.db_path}.key")
    # What there is to steal, as root sees it: the attempts below are not empty-handed.
    assert server.db_path.exists() and key.exists()
    assert (
        server.admin_token
        and server.admin_token.encode() in Path(f"/proc/{serve_pid}/environ").read_bytes()
    )
    targets = {
        "database": server.db_path,
        "wal": Path(f"{server.db_path}-wal"),
        "key": key,
        "service environ": Path(f"/proc/{serve_pid}/environ"),
        "victim environ": Path(f"/proc/{victim_agent}/environ"),
        "victim log": server.workdir(theirs["id"]) / "agent.log",
    }
    script = "\n".join(
        [f'cat "{path}" >/dev/null 2>&1 && echo "read {name}"' for name, path in targets.items()]
        + [
            f'ls "{server.workdir(theirs["id"])}" >/dev/null 2>&1 && echo "listed victim dir"',
            f'kill -0 {victim_agent} 2>/dev/null && echo "signalled victim"',
            f'kill -0 {serve_pid} 2>/dev/null && echo "signalled service"',
            f'grep -qs "{server.admin_token}" /proc/[0-9]*/environ && echo "found admin token"',
            "echo done",
        ]
    )

    result = _run(mine, script)

    assert result["stdout"].split() == ["done"], result
    assert _run(theirs, "echo still-here")["stdout"].strip() == "still-here"
    for path in (server.db_path, key):
        assert path.stat().st_mode & 0o077 == 0, path


def test_slow_clients_neither_stall_the_service_nor_stay_connected(server: ServerProcess) -> None:
    partial = b"POST /v1/workers/w-0000000000000000000a/ready HTTP/1.1\r\nHost: x\r\n"
    sockets = []
    try:
        for _ in range(100):  # the old server stalled with 33
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(partial)
            sockets.append(sock)
        for _ in range(20):
            assert server.request("GET", "/healthz", timeout=20).status_code == 200
        dropped = 0
        for sock in sockets:
            sock.settimeout(60)  # the header timeout is 5 s; 60 only bounds a hang
            try:
                while sock.recv(1024):
                    pass
            except OSError:
                continue
            dropped += 1
        assert dropped == len(sockets)
    finally:
        for sock in sockets:
            sock.close()


def test_waiting_requests_leave_room_for_everyone_and_one_tenant_is_capped(
    server: ServerProcess,
) -> None:
    server.wait_ready_workers(2)
    server.admin("PATCH", f"/v1/admin/pools/{POOL}", json={"min_ready": 0, "max_workers": 1})
    blocker = server.create_tenant("blocker")["token"]
    held = server.request(
        "POST", "/v1/leases", token=blocker, json={"pool": POOL, "wait_seconds": 60}, timeout=90
    )
    assert held.status_code == 201, held.text
    wait_until(lambda: server.pool_counts()["ready"] == 0, 60, message="surplus never trimmed")
    tokens = [server.create_tenant(f"waiter-{i}")["token"] for i in range(40)]
    answers: dict[int, requests.Response] = {}

    def wait_for_a_worker(index: int) -> None:
        answers[index] = server.request(
            "POST",
            "/v1/leases",
            token=tokens[index],
            json={"pool": POOL, "wait_seconds": 60},
            timeout=120,
        )

    with ThreadPoolExecutor(60) as executor:
        for index in range(40):
            executor.submit(wait_for_a_worker, index)
        wait_until(lambda: server.pool_counts()["pending_leases"] == 40, 60, message="not queued")
        # 40 requests wait (the old server had 32 threads): everyone else still gets in.
        assert server.request("GET", "/healthz", timeout=30).status_code == 200
        assert server.admin("GET", "/v1/admin/pools", timeout=30).status_code == 200
        other = server.create_tenant("other")["token"]
        assert server.request("GET", "/v1/pools", token=other, timeout=30).status_code == 200
        # One tenant long-polling its lease many times over hits its cap (16 waits).
        lease_id = server.request("GET", "/v1/leases", token=tokens[0]).json()["leases"][0]["id"]
        polls = list(
            executor.map(
                lambda _: (
                    server.request(
                        "GET", f"/v1/leases/{lease_id}?wait_seconds=5", token=tokens[0], timeout=60
                    ).status_code
                ),
                range(20),
            )
        )
        assert polls.count(429) >= 4 and set(polls) <= {200, 429}, polls
        # The worker comes back: its agent's ready callback lands and serves the oldest.
        server.request("DELETE", f"/v1/leases/{held.json()['id']}", token=blocker)
        wait_until(
            lambda: any(a.status_code == 201 for a in list(answers.values())),
            90,
            message=server.log_tail,
        )
        # The others would wait out their 60 s: a stopping service answers them at once,
        # as if their wait had timed out.
        assert server.stop(timeout=60) == 0, server.log_tail()
    statuses = sorted(a.status_code for a in answers.values())
    assert len(statuses) == 40 and statuses.count(201) == 1, statuses
    assert set(statuses) == {201, 202}, statuses
