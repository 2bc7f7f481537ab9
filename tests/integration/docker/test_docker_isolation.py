"""What a tenant's script in a docker worker cannot do (security finding 2 of issue 10).

Each test leases two workers of the real service (two tenants), runs scripts through
the agent's HTTP API with the lease's access token, as a tenant does, and proves one
default: the host's loopback is out of reach, another worker's agent wants its own
token, scripts run as a non-root user without capabilities, and the container's
pids and memory limits stop a fork bomb and a memory hog while the service and the
other worker keep answering. Every one of them failed on the old defaults (host
network, root, no limits). Every loop in a script is bounded in count and in time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import docker
import pytest
import requests

from provisioners.docker import default_network_name
from tests.integration.docker.conftest import docker_pool
from tests.support.live import LiveService, live_service

pytestmark = [pytest.mark.integration, pytest.mark.docker]

POOL = "hosted-ubuntu"


@dataclass
class TwoWorkers:
    live: LiveService
    mine: dict[str, Any]  # the worker of tenant "acme", whose scripts the test runs
    other: dict[str, Any]  # the worker of tenant "globex"


def run_script(worker: dict[str, Any], script: str, timeout_s: int = 60) -> dict[str, Any]:
    """Run ``script`` on the worker's agent with the worker's own access token."""
    response = requests.post(
        f"{worker['agent_url']}/run",
        json={"script": script, "timeout_s": timeout_s},
        headers={"Authorization": f"Bearer {worker['access_token']}"},
        timeout=timeout_s + 30,
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def assert_all_still_answer(workers: TwoWorkers) -> None:
    """The service, the worker that ran the script and the other worker all answer."""
    assert workers.live.call("GET", "/healthz").status_code == 200
    for worker in (workers.mine, workers.other):
        result = run_script(worker, "echo alive", timeout_s=20)
        assert (result["exit_code"], result["stdout"]) == (0, "alive\n")


@pytest.fixture
def workers(tmp_path: Path, testing_image: str, deployment: str) -> Iterator[TwoWorkers]:
    pool = docker_pool(testing_image)
    pool["min_ready"] = 2
    with live_service(
        f"sqlite:///{tmp_path / 'wl.db'}", [pool], deployment, host="0.0.0.0"
    ) as live:
        live.tick_until(lambda: live.pool_counts(POOL)["ready"] >= 2)
        leased = []
        for tenant in ("acme", "globex"):
            response = live.call(
                "POST", "/v1/leases", live.tenant_token(tenant), json={"pool": POOL}
            )
            assert response.status_code == 201, response.text
            leased.append(response.json()["worker"])
        yield TwoWorkers(live, *leased)


class CountingServer:
    """An HTTP server the host binds to 127.0.0.1 only; counts the requests it gets."""

    def __init__(self) -> None:
        self.hits = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits += 1
                self.send_response(200)
                self.send_header("Content-Length", "6")
                self.end_headers()
                self.wfile.write(b"secret")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def loopback_server() -> Iterator[CountingServer]:
    server = CountingServer()
    yield server
    server.close()


# Tries each URL once, 3 s at most, and prints "reached" or "blocked <reason>" for each.
PROBE = """\
python3 - {urls} <<'EOF'
import sys, urllib.request
for url in sys.argv[1:]:
    try:
        urllib.request.urlopen(url, timeout=3).read()
        print(url, "reached")
    except OSError as exc:
        print(url, "blocked", type(exc).__name__)
EOF
"""


def test_a_tenant_script_cannot_reach_a_server_bound_to_the_hosts_loopback(
    workers: TwoWorkers,
    loopback_server: CountingServer,
    docker_engine: docker.DockerClient,
    deployment: str,
) -> None:
    url = f"http://127.0.0.1:{loopback_server.port}/"
    assert requests.get(url, timeout=10).text == "secret"  # the host itself reaches it
    network = docker_engine.networks.get(default_network_name(deployment))
    gateway = network.attrs["IPAM"]["Config"][0]["Gateway"]
    urls = [url, f"http://{gateway}:{loopback_server.port}/"]

    result = run_script(workers.mine, PROBE.format(urls=" ".join(urls)))

    assert result["exit_code"] == 0, result
    lines = result["stdout"].splitlines()
    assert [line.split()[:2] for line in lines] == [[u, "blocked"] for u in urls], lines
    assert loopback_server.hits == 1  # the host's own request only


def test_another_workers_agent_is_on_its_bridge_address_and_refuses_without_its_token(
    workers: TwoWorkers, docker_engine: docker.DockerClient, deployment: str
) -> None:
    other = workers.other
    container = docker_engine.containers.get(f"workerlease-{other['id']}")
    bridge = container.attrs["NetworkSettings"]["Networks"][default_network_name(deployment)]
    assert (
        other["agent_url"] == f"http://{bridge['IPAddress']}:{other['agent_url'].rsplit(':', 1)[1]}"
    )
    script = f"""\
python3 - <<'EOF'
import urllib.error, urllib.request
for token in (None, {workers.mine["access_token"]!r}):
    request = urllib.request.Request({other["agent_url"] + "/run"!r}, method="POST",
                                     data=b'{{"script": "id"}}')
    if token:
        request.add_header("Authorization", "Bearer " + token)
    try:
        print(urllib.request.urlopen(request, timeout=10).status)
    except urllib.error.HTTPError as exc:
        print(exc.code)
EOF
"""

    result = run_script(workers.mine, script)

    assert result["exit_code"] == 0, result
    assert result["stdout"].split() == ["401", "401"]  # no token; this worker's own token
    assert run_script(other, "echo mine")["stdout"] == "mine\n"  # its own token works


def test_tenant_scripts_run_as_a_non_root_user_without_capabilities(workers: TwoWorkers) -> None:
    result = run_script(
        workers.mine, "id -u; grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status"
    )

    assert result["exit_code"] == 0, result
    uid, *status = result["stdout"].splitlines()
    assert int(uid) != 0
    assert dict(line.split(":\t") for line in status) == {
        "CapEff": "0000000000000000",
        "CapBnd": "0000000000000000",
        "NoNewPrivs": "1",
    }


# Forks sleeping children until a fork fails or 4000 are running, then kills and reaps them.
FORK_BOMB = """\
timeout 20 python3 - <<'EOF'
import os, signal, time
children = []
try:
    while len(children) < 4000:
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children.append(pid)
    print("forked", len(children))
except OSError as exc:
    print("fork_failed", len(children), exc.errno)
for pid in children:
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
EOF
"""


def test_a_fork_bomb_is_stopped_by_the_pids_limit_and_everyone_keeps_answering(
    workers: TwoWorkers,
) -> None:
    result = run_script(workers.mine, FORK_BOMB)

    assert result["exit_code"] == 0, result
    outcome, forked, *errno = result["stdout"].split()
    assert outcome == "fork_failed", result  # not "forked 4000": the limit (512) stopped it
    assert int(forked) < 512 and errno == ["11"]  # EAGAIN
    assert_all_still_answer(workers)


# Touches 64 MiB at a time, up to 3 GiB (three times the 1 GiB default limit), 60 s at most.
MEMORY_HOG = """\
timeout 60 python3 - <<'EOF'
chunks = []
for i in range(48):
    chunks.append(b"x" * (64 << 20))
    print(len(chunks) * 64, flush=True)
print("allocated_all")
EOF
"""


def test_a_memory_hog_is_stopped_by_the_memory_limit_and_everyone_keeps_answering(
    workers: TwoWorkers,
) -> None:
    result = run_script(workers.mine, MEMORY_HOG, timeout_s=90)

    assert "allocated_all" not in result["stdout"], result
    assert result["exit_code"] == 137, result  # 128 + SIGKILL: the cgroup's OOM killer
    assert int(result["stdout"].split()[-1]) <= 1024  # MiB held when it was killed
    assert_all_still_answer(workers)
