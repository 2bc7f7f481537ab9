"""Tasks end to end: a real ``workerlease serve``, real local agents polling it, over HTTP.

What a tenant does (submit, follow the log with ``offset``/``wait_seconds``, cancel,
release) against what really happens on the worker: exact output bytes, exit codes,
process trees gone after a timeout or a cancel, the idle clock held off, the agent
killed and the service restarted in the middle of a task. Waits are bounded loops on
outcomes (``wait_until`` / the log's own long poll), never fixed sleeps.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from tests.support.postgres import PostgresServer
from tests.support.server import ServerProcess, pool, proc_info, wait_until

pytestmark = pytest.mark.integration

POOL = "hosted-ubuntu"
ENDED = {"succeeded", "failed", "timed_out", "cancelled", "lost"}


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    servers: list[ServerProcess] = []

    def make(**kwargs: Any) -> ServerProcess:
        directory = tmp_path / f"s{len(servers)}"
        directory.mkdir()
        server = ServerProcess(directory, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def _plain_pool(**overrides: Any) -> dict[str, Any]:
    # No execution containers: a local pool keeps its isolation (see provisioners/local).
    return pool(min_ready=1, max_workers=3, capabilities=[], **overrides)


class Tenant:
    def __init__(self, server: ServerProcess, name: str, pool_name: str = POOL) -> None:
        self.server = server
        self.token = server.create_tenant(name)["token"]
        server.wait_ready_workers(1, pool=pool_name)
        answer = server.request(
            "POST",
            "/v1/leases",
            token=self.token,
            json={"pool": pool_name, "wait_seconds": 60},
            timeout=90,
        )
        assert answer.status_code in (200, 201), answer.text
        self.lease: dict[str, Any] = answer.json()
        assert self.lease["state"] == "active", self.lease

    @property
    def base(self) -> str:
        return f"/v1/leases/{self.lease['id']}/tasks"

    def submit(self, script: str, **body: Any) -> dict[str, Any]:
        answer = self.server.request(
            "POST", self.base, token=self.token, json={"script": script, **body}
        )
        assert answer.status_code == 201, answer.text
        task: dict[str, Any] = answer.json()
        return task

    def task(self, task_id: str) -> dict[str, Any]:
        answer = self.server.request("GET", f"{self.base}/{task_id}", token=self.token)
        assert answer.status_code == 200, answer.text
        task: dict[str, Any] = answer.json()
        return task

    def follow(self, task_id: str, timeout: float = 120) -> tuple[bytes, str, int]:
        """The whole log, read as a client follows it: offset to offset, long polls.
        Returns the bytes, the end state and how many reads it took."""
        data, offset, reads = b"", 0, 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self.server.request(
                "GET",
                f"{self.base}/{task_id}/log",
                token=self.token,
                params={"offset": offset, "wait_seconds": 20},
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
            reads += 1
            assert int(answer.headers["X-Next-Offset"]) == offset + len(answer.content)
            data += answer.content
            offset += len(answer.content)
            if not answer.content and answer.headers["X-Task-State"] in ENDED:
                return data, answer.headers["X-Task-State"], reads
        raise AssertionError(f"task {task_id} did not end within {timeout} s: {data[-500:]!r}")

    def wait_state(self, task_id: str, states: set[str], timeout: float = 60) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def reached() -> bool:
            found.update(self.task(task_id))
            return found["state"] in states

        wait_until(reached, timeout, message=lambda: f"task never reached {states}: {found}")
        return found

    def cancel(self, task_id: str) -> Any:
        return self.server.request("POST", f"{self.base}/{task_id}/cancel", token=self.token)


def _gone(pid: int) -> bool:
    info = proc_info(pid)
    return info is None or info.state in ("Z", "X")


def _pid_in(log: bytes, name: str) -> int:
    match = re.search(rf"{name}=(\d+)".encode(), log)
    assert match, log
    return int(match.group(1))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "sqlite":
        return {}
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return {
        "database_url": server.create_database(),
        "encryption_key": Fernet.generate_key().decode(),
    }


LINES = r"""
for i in 1 2 3 4 5; do
  echo "out $i"
  echo "err $i" >&2
  sleep 0.2
done
printf 'no newline at the end'
exit {code}
"""


def test_a_task_runs_and_its_log_is_followed_to_the_end_exactly(
    make_server: Callable[..., ServerProcess], database: dict[str, Any]
) -> None:
    server = make_server(pools=[_plain_pool()], extra=database).start()
    tenant = Tenant(server, "acme")
    ok = tenant.submit(LINES.format(code=0))
    failing = tenant.submit(LINES.format(code=3))
    expected = b"".join(f"out {i}\nerr {i}\n".encode() for i in range(1, 6))
    expected += b"no newline at the end"
    for task, state, code in ((ok, "succeeded", 0), (failing, "failed", 3)):
        log, end, _reads = tenant.follow(task["id"])
        assert (log, end) == (expected, state)
        final = tenant.task(task["id"])
        assert (final["exit_code"], final["log_bytes"]) == (code, len(expected))
        assert final["started_at"] and final["finished_at"]


def test_timeout_kills_the_whole_process_tree(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(pools=[_plain_pool()]).start()
    tenant = Tenant(server, "acme")
    task = tenant.submit("sleep 300 & echo child=$!; sleep 300", timeout_s=2)
    log, end, _ = tenant.follow(task["id"])
    assert end == "timed_out"
    child = _pid_in(log, "child")
    wait_until(lambda: _gone(child), 10, message=f"the script's child {child} survived")
    assert tenant.task(task["id"])["error"] == "killed after timeout_s=2"


def test_cancel_ends_a_running_task_within_seconds_and_a_queued_one_at_once(
    make_server: Callable[..., ServerProcess], database: dict[str, Any]
) -> None:
    server = make_server(pools=[_plain_pool(max_concurrent_tasks=2)], extra=database).start()
    tenant = Tenant(server, "acme")
    first = tenant.submit("sleep 300 & echo child=$!; sleep 300")
    second = tenant.submit("sleep 300")
    third = tenant.submit("echo third")
    tenant.wait_state(first["id"], {"running"})
    tenant.wait_state(second["id"], {"running"})
    # Two running, the third waits its turn: the pool's max_concurrent_tasks.
    assert tenant.task(third["id"])["state"] == "queued"
    # Output so far, to learn the child's pid.
    seen: dict[str, bytes] = {}

    def child_printed() -> bool:
        seen["log"] = server.request(
            "GET", f"{tenant.base}/{first['id']}/log", token=tenant.token
        ).content
        return b"child=" in seen["log"]

    wait_until(child_printed, 30, message="the first task printed nothing")
    child = _pid_in(seen["log"], "child")
    asked = time.monotonic()
    assert tenant.cancel(first["id"]).status_code == 202
    cancelled = tenant.wait_state(first["id"], {"cancelled"}, timeout=30)
    assert cancelled["error"] == "cancelled by the tenant"
    wait_until(lambda: _gone(child), 10, message=f"the cancelled task's child {child} survived")
    took = time.monotonic() - asked
    # The freed slot goes to the queued task, which runs to its end.
    log, end, _ = tenant.follow(third["id"])
    assert (log, end) == (b"third\n", "succeeded")
    # A cancel that arrives after the end changes nothing.
    again = tenant.cancel(first["id"])
    assert again.status_code == 200 and again.json()["state"] == "cancelled"
    assert took < 30  # the bound is the wait above; the 10 s is measured in the bench


def test_files_and_env_reach_the_script_and_the_env_is_never_shown(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server(pools=[_plain_pool()]).start()
    tenant = Tenant(server, "acme")
    secret = "s3cret-value-7f1e"
    task = tenant.submit(
        'cat conf/app.yaml; printf "%s" "$DEPLOY_TOKEN" | sha256sum | cut -c1-16; pwd',
        env={"DEPLOY_TOKEN": secret},
        files={"conf/app.yaml": base64.b64encode(b"replicas: 3\n").decode()},
    )
    log, end, _ = tenant.follow(task["id"])
    assert end == "succeeded", log
    assert log.startswith(
        b"replicas: 3\n" + hashlib.sha256(secret.encode()).hexdigest()[:16].encode()
    )
    assert secret.encode() not in log
    shown = server.request("GET", tenant.base, token=tenant.token).text
    assert secret not in shown and "DEPLOY_TOKEN" not in shown
    assert secret not in server.log_text()
    escape = server.request(
        "POST",
        tenant.base,
        token=tenant.token,
        json={"script": "true", "files": {"../../escape": "eA=="}},
    )
    assert escape.status_code == 422


def test_a_running_task_holds_off_the_idle_timeout_and_the_lease_end_ends_tasks(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server(pools=[_plain_pool(lease_idle_timeout="3s")]).start()
    tenant = Tenant(server, "acme")
    task = tenant.submit("sleep 8; echo done")
    tenant.wait_state(task["id"], {"running"})
    started = time.monotonic()
    # Past the idle timeout, twice over, while the task runs: the lease stays.
    while time.monotonic() - started < 6:
        state = tenant.task(task["id"])["state"]
        lease = server.request("GET", f"/v1/leases/{tenant.lease['id']}", token=tenant.token)
        if state == "running":
            assert lease.json()["state"] == "active", lease.json()
        time.sleep(0.5)
    log, end, _ = tenant.follow(task["id"])
    assert (log, end) == (b"done\n", "succeeded")
    # Idle now: the lease expires some seconds after its last task ended.
    wait_until(
        lambda: (
            server.request("GET", f"/v1/leases/{tenant.lease['id']}", token=tenant.token).json()[
                "end_reason"
            ]
            == "idle_timeout"
        ),
        60,
        message="the idle lease never expired",
    )

    second = Tenant(server, "beta")
    running = second.submit("sleep 300")
    queued = [second.submit("sleep 300") for _ in range(4)][-1]
    second.wait_state(running["id"], {"running"})
    released = server.request("DELETE", f"/v1/leases/{second.lease['id']}", token=second.token)
    assert released.status_code == 200
    assert second.task(running["id"])["state"] == "cancelled"
    assert second.task(queued["id"])["state"] == "cancelled"
    assert "lease ended (released)" in second.task(running["id"])["error"]


def test_the_agent_killed_mid_task_loses_the_task(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server(pools=[_plain_pool()]).start()
    tenant = Tenant(server, "acme")
    task = tenant.submit("echo started; sleep 300")
    tenant.wait_state(task["id"], {"running"})
    worker_id = tenant.lease["worker"]["id"]
    agents = server.agents()
    assert worker_id in agents
    os.kill(agents[worker_id], signal.SIGKILL)
    lost = tenant.wait_state(task["id"], {"lost"}, timeout=90)
    assert "lease ended (failed)" in lost["error"]


def test_the_service_restarted_mid_task_loses_no_output(
    make_server: Callable[..., ServerProcess], database: dict[str, Any]
) -> None:
    server = make_server(pools=[_plain_pool()], extra=database).start()
    tenant = Tenant(server, "acme")
    script = 'for i in $(seq 1 60); do echo "line $i"; sleep 0.1; done'
    task = tenant.submit(script)
    tenant.wait_state(task["id"], {"running"})
    server.stop()
    time.sleep(1)  # the agent's retries meet a closed port: they must back off and keep it
    server.start()
    log, end, _ = tenant.follow(task["id"])
    assert end == "succeeded"
    assert log == b"".join(f"line {i}\n".encode() for i in range(1, 61))


def test_ended_tasks_are_purged_after_task_retention(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server(pools=[_plain_pool()], extra={"task_retention": "2s"}).start()
    tenant = Tenant(server, "acme")
    task = tenant.submit("echo bye")
    tenant.follow(task["id"])
    wait_until(
        lambda: (
            server.request("GET", f"{tenant.base}/{task['id']}", token=tenant.token).status_code
            == 404
        ),
        60,
        message="the task was never purged",
    )


@pytest.fixture(scope="module")
def testing_image() -> str:
    """The offline test image, as the execution containers' task image (built by make test)."""
    from images.build import ImageBuildError, build_image

    try:
        return build_image("testing")
    except ImageBuildError as exc:
        pytest.fail(f"cannot build images/testing: {exc}", pytrace=False)


def test_execution_containers_through_the_service(
    make_server: Callable[..., ServerProcess], testing_image: str
) -> None:
    container_pool = pool(
        min_ready=1,
        max_workers=2,
        capabilities=["execution-containers"],
        # Nothing is ever pulled: this host reaches no registry (and must not try).
        options={"agent_env": {"WORKERLEASE_CONTAINER_PULL": "never"}},
    )
    server = make_server(pools=[container_pool]).start()
    pools = server.admin("GET", "/v1/admin/pools").json()["pools"]
    assert "GIVES UP WORKER ISOLATION" in (pools[0]["warning"] or "")
    tenant = Tenant(server, "acme")
    task = tenant.submit(
        'echo "in $(cat /etc/os-release | head -1)"; cat job.txt; pwd; echo "$GREETING"',
        container={"image": testing_image},
        env={"GREETING": "hello"},
        files={"job.txt": base64.b64encode(b"the job\n").decode()},
    )
    log, end, _ = tenant.follow(task["id"])
    assert end == "succeeded", log
    lines = log.decode().splitlines()
    assert lines[0].startswith("in PRETTY_NAME=") and lines[1:] == [
        "the job",
        "/workspace",
        "hello",
    ]
    assert tenant.task(task["id"])["container"] == {"image": testing_image}
    missing = tenant.submit("true", container={"image": "workerlease/no-such-image:0"})
    _log, end, _ = tenant.follow(missing["id"])
    failed = tenant.task(missing["id"])
    assert end == "failed" and "no-such-image" in (failed["error"] or ""), failed
