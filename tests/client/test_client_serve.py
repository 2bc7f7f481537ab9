"""The SDK and ``wl`` against a real ``workerlease serve`` with local pools.

One server for the module (starting one costs seconds on a loaded machine); each test
has a tenant of its own, so its leases are its own. Outcomes are checked through the
tenant API, and waits are polls with deadlines.

The task tests need the task API (docs/tasks.md); they are skipped only while the
service answers ``GET /v1/leases/<id>/tasks`` of an active lease with 404.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from workerlease_client import Client, Conflict, NotFound, ValidationError

from tests.support.server import ServerProcess, pool, wait_until

pytestmark = pytest.mark.integration

POOL = "hosted-ubuntu"
SHORT = "short-idle"
SHORT_IDLE_S = 5
WL = str(Path(sys.executable).parent / "wl")


@dataclass
class Served:
    server: ServerProcess
    tasks: bool  # the task API is there
    agent_runs: bool | None = None  # a worker's agent picks tasks up (probed once)

    @property
    def url(self) -> str:
        return self.server.url

    def tenant(self) -> str:
        token: str = self.server.create_tenant(f"client-{uuid.uuid4().hex[:8]}")["token"]
        return token

    def lease(self, token: str, lease_id: str) -> dict[str, Any]:
        response = self.server.request("GET", f"/v1/leases/{lease_id}", token=token)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def leases(self, token: str, state: str = "all") -> list[dict[str, Any]]:
        response = self.server.request("GET", f"/v1/leases?state={state}", token=token)
        assert response.status_code == 200, response.text
        leases: list[dict[str, Any]] = response.json()["leases"]
        return leases

    def tasks_of(self, token: str, lease_id: str) -> list[dict[str, Any]]:
        response = self.server.request("GET", f"/v1/leases/{lease_id}/tasks", token=token)
        assert response.status_code == 200, response.text
        tasks: list[dict[str, Any]] = response.json()["tasks"]
        return tasks


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = ServerProcess(
        tmp_path_factory.mktemp("serve"),
        pools=[
            pool(POOL, min_ready=2, max_workers=6),
            pool(SHORT, min_ready=1, max_workers=3, lease_idle_timeout=f"{SHORT_IDLE_S}s"),
        ],
    )
    try:
        server.start()
        server.wait_ready_workers(1)
        yield Served(server, tasks=_task_api_present(server))
    finally:
        server.close()


def _task_api_present(server: ServerProcess) -> bool:
    token = server.create_tenant("probe")["token"]
    leased = server.request(
        "POST", "/v1/leases", token=token, json={"pool": POOL, "wait_seconds": 60}, timeout=90
    )
    assert leased.status_code in (200, 201), leased.text
    lease_id = leased.json()["id"]
    try:
        response = server.request("GET", f"/v1/leases/{lease_id}/tasks", token=token)
        return response.status_code != 404
    finally:
        server.request("DELETE", f"/v1/leases/{lease_id}", token=token)


@pytest.fixture
def tasks_api(served: Served) -> Served:
    if not served.tasks:
        pytest.skip("the service has no task API yet (GET /v1/leases/<id>/tasks is 404)")
    return served


@pytest.fixture
def agent_runs_tasks(tasks_api: Served) -> Served:
    """The task API and an agent that runs what it is given. The agent's side (polling
    for tasks) is separate work from the service's; while a probe task stays queued for
    a minute on an active lease, tests that need output are skipped, saying so."""
    if tasks_api.agent_runs is None:
        tasks_api.agent_runs = _probe_agent(tasks_api)
    if not tasks_api.agent_runs:
        pytest.skip("the worker agent does not run tasks yet (a probe task stayed queued 60 s)")
    return tasks_api


def _probe_agent(served: Served) -> bool:
    token = served.tenant()
    with Client(served.url, token) as client, client.lease(POOL, wait=120) as lease:
        task = lease.submit("true")
        deadline = time.monotonic() + 60
        while task.refresh().state == "queued" and time.monotonic() < deadline:
            time.sleep(0.5)
        return task.info.state != "queued"


def wl(
    served: Served, token: str, *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WORKERLEASE_URL": served.url, "WORKERLEASE_TOKEN": token}
    return subprocess.run(
        [WL, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ---- leases through wl ---------------------------------------------------------------


def test_wl_pools_and_the_lease_commands_in_tables_and_json(served: Served) -> None:
    token = served.tenant()
    table = wl(served, token, "pools")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:2] == ["NAME", "OS"]
    assert {row.split()[0] for row in rows} == {POOL, SHORT}
    column = header.index("OS")  # aligned: every row's OS starts under the header's
    assert all(row[column:].startswith("ubuntu ") for row in rows), table.stdout
    assert "  1h  " in rows[0] and "  3d  " in rows[0]
    pools = json.loads(wl(served, token, "pools", "--json").stdout)
    assert {p["name"] for p in pools["pools"]} == {POOL, SHORT}

    acquired = wl(served, token, "lease", "acquire", POOL, "--wait", "120", "--json")
    assert acquired.returncode == 0, acquired.stderr
    lease = json.loads(acquired.stdout)
    assert lease["state"] == "active" and lease["pool"] == POOL
    assert acquired.stderr == ""  # not a terminal: no progress line

    listed = json.loads(wl(served, token, "lease", "list", "--json").stdout)
    assert [item["id"] for item in listed["leases"]] == [lease["id"]]
    shown = wl(served, token, "lease", "show", lease["id"])
    assert shown.returncode == 0 and f"id            {lease['id']}" in shown.stdout
    table_list = wl(served, token, "--json", "lease", "list")  # --json before the command too
    assert json.loads(table_list.stdout)["leases"][0]["id"] == lease["id"]

    renewed = json.loads(wl(served, token, "lease", "renew", lease["id"], "--json").stdout)
    assert renewed["idle_expires_at"] >= lease["idle_expires_at"]
    released = wl(served, token, "lease", "release", lease["id"], "--json")
    assert json.loads(released.stdout)["state"] == "released"
    assert served.lease(token, lease["id"])["state"] == "released"

    missing = wl(served, token, "lease", "show", "l-00000000000000000000")
    assert missing.returncode == 1 and missing.stdout == ""
    assert one_line_error(missing).startswith("error: Not found: ")
    ended = wl(served, token, "lease", "renew", lease["id"])
    assert ended.returncode == 1 and one_line_error(ended).startswith("error: Conflict: ")
    bad_token = wl(served, "wlt_not-a-token", "pools")
    assert bad_token.returncode == 1 and one_line_error(bad_token).startswith("error: Unauthorized")


def test_wl_usage_errors_and_configuration_errors_are_one_line(served: Served) -> None:
    token = served.tenant()
    usage = wl(served, token, "lease", "show")
    assert usage.returncode == 2 and one_line_error(usage).startswith("error: usage: ")
    no_script = wl(served, token, "run", POOL)
    assert no_script.returncode == 2 and "no script" in one_line_error(no_script)
    assert served.leases(token) == []  # refused before anything was leased
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERLEASE_")}
    unconfigured = subprocess.run(
        [WL, "pools"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert unconfigured.returncode == 1
    assert "WORKERLEASE_URL" in one_line_error(unconfigured)


# ---- the SDK -------------------------------------------------------------------------


def test_sdk_with_block_releases_on_an_exception(served: Served) -> None:
    token = served.tenant()
    held: list[str] = []
    client = Client(served.url, token)
    with (
        pytest.raises(RuntimeError, match="the step failed"),
        client,
        client.lease(POOL, 120) as lease,
    ):
        held.append(lease.id)
        assert lease.info.state == "active" and lease.worker is not None
        assert served.lease(token, lease.id)["state"] == "active"
        raise RuntimeError("the step failed")
    assert served.lease(token, held[0])["state"] == "released"
    assert served.lease(token, held[0])["end_reason"] == "released"


def test_sdk_background_renew_keeps_a_lease_past_its_idle_timeout(served: Served) -> None:
    token = served.tenant()
    with Client(served.url, token) as client:
        # The control: not renewed, a lease of this pool ends within its idle timeout.
        idle = client.acquire(SHORT, wait=120)
        wait_until(
            lambda: served.lease(token, idle.id)["state"] == "expired",
            SHORT_IDLE_S + 60,
            message="an idle lease of the short pool never expired",
        )
        with client.lease(SHORT, wait=120) as lease:
            held_until = time.monotonic() + 3 * SHORT_IDLE_S
            while time.monotonic() < held_until:
                assert served.lease(token, lease.id)["state"] == "active", lease.ended
                time.sleep(0.5)
            assert lease.ended is None
        assert served.lease(token, lease.id)["end_reason"] == "released"


def test_sdk_errors_carry_the_problem_document(served: Served) -> None:
    token = served.tenant()
    with Client(served.url, token) as client:
        with pytest.raises(NotFound) as missing:
            client.get_lease("l-00000000000000000000")
        assert missing.value.status == 404 and missing.value.title == "Not found"
        lease = client.acquire(POOL, wait=120)
        again = client.request_lease(POOL)
        assert again.existing and again.id == lease.id
        client.release_lease(lease.id)
        with pytest.raises(Conflict) as ended:
            client.renew_lease(lease.id)
        assert ended.value.problem["status"] == 409 and "ended" in ended.value.detail


# ---- tasks: what works whether or not an agent runs them --------------------------------


def test_task_commands_and_sdk_calls_against_the_real_task_api(tasks_api: Served) -> None:
    token = tasks_api.tenant()
    with Client(tasks_api.url, token) as client, client.lease(POOL, wait=120) as lease:
        submitted = wl(
            tasks_api,
            token,
            "task",
            "run",
            lease.id,
            "--detach",
            "--json",
            "--timeout",
            "90",
            "--env",
            "A=1",
            "--",
            "sleep 100",
        )
        assert submitted.returncode == 0, submitted.stderr
        task = json.loads(submitted.stdout)
        assert task["lease_id"] == lease.id and task["timeout_s"] == 90
        assert task["state"] in ("queued", "running")

        listed = json.loads(wl(tasks_api, token, "task", "list", lease.id, "--json").stdout)
        assert [t["id"] for t in listed["tasks"]] == [task["id"]]
        table = wl(tasks_api, token, "task", "list", lease.id)
        assert table.stdout.splitlines()[0].split()[:3] == ["ID", "STATE", "EXIT"]
        assert task["id"] in table.stdout
        so_far = json.loads(
            wl(tasks_api, token, "task", "log", lease.id, task["id"], "--json").stdout
        )
        assert so_far["next_offset"] == len(so_far["log"].encode())

        cancelled = wl(tasks_api, token, "task", "cancel", lease.id, task["id"], "--json")
        assert cancelled.returncode == 0, cancelled.stderr
        wait_until(
            lambda: lease.task(task["id"]).info.state == "cancelled",
            60,
            message="the cancelled task never ended",
        )
        followed = wl(tasks_api, token, "task", "log", lease.id, task["id"], "--follow")
        assert followed.returncode == 0, followed.stderr  # ends: the task has ended

        with pytest.raises(ValidationError) as refused:
            lease.submit("true", files={"../outside": b"x"})
        assert refused.value.status == 422 and refused.value.errors
        missing = wl(tasks_api, token, "task", "cancel", lease.id, "t-00000000000000000000")
        assert missing.returncode == 1 and one_line_error(missing).startswith("error: ")
    with pytest.raises(Conflict):  # the lease has been released: no new tasks
        Client(tasks_api.url, token).submit_task(lease.id, "true")


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_sigint_during_wl_run_cancels_the_task_and_releases_the_lease(
    tasks_api: Served, signum: int, code: int
) -> None:
    token = tasks_api.tenant()
    env = {**os.environ, "WORKERLEASE_URL": tasks_api.url, "WORKERLEASE_TOKEN": token}
    process = subprocess.Popen(
        [WL, "run", POOL, "--wait", "120", "--", "echo started; sleep 120; echo never"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:

        def task_submitted() -> list[dict[str, Any]]:
            leases = tasks_api.leases(token, "live")
            return tasks_api.tasks_of(token, leases[0]["id"]) if leases else []

        wait_until(task_submitted, 120, message="wl run never submitted its task")
        process.send_signal(signum)
        assert process.wait(120) == code
        stderr = process.stderr.read()  # type: ignore[union-attr]
        assert "Interrupted: task cancelled and lease released" in stderr, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    (lease,) = tasks_api.leases(token)
    assert lease["state"] == "released"
    (task,) = tasks_api.tasks_of(token, lease["id"])
    assert task["state"] == "cancelled"


# ---- tasks run by the worker's agent -------------------------------------------------


def test_wl_run_streams_output_and_returns_the_exit_code(agent_runs_tasks: Served) -> None:
    served = agent_runs_tasks
    token = served.tenant()
    ok = wl(served, token, "run", POOL, "--wait", "120", "--", "echo hello; echo ünïcode ✓")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "hello\nünïcode ✓\n"
    failed = wl(served, token, "run", POOL, "--wait", "120", "--", "echo before; exit 3")
    assert failed.returncode == 3 and failed.stdout == "before\n", failed.stderr
    timed_out = wl(served, token, "run", POOL, "--wait", "120", "--timeout", "1", "--", "sleep 60")
    assert timed_out.returncode == 124, timed_out.stderr
    assert one_line_error(timed_out).startswith("error: Timed out")
    assert all(lease["state"] == "released" for lease in served.leases(token))


def test_wl_run_output_comes_while_the_script_runs(agent_runs_tasks: Served) -> None:
    served = agent_runs_tasks
    token = served.tenant()
    env = {**os.environ, "WORKERLEASE_URL": served.url, "WORKERLEASE_TOKEN": token}
    process = subprocess.Popen(
        [WL, "run", POOL, "--wait", "120", "--", "echo started; sleep 120"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        first_line: list[str] = []
        reader = threading.Thread(
            target=lambda: first_line.append(process.stdout.readline())  # type: ignore[union-attr]
        )
        reader.start()
        reader.join(120)
        assert first_line == ["started\n"] and process.poll() is None
        process.send_signal(signal.SIGINT)
        assert process.wait(120) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    (lease,) = served.leases(token)
    assert lease["state"] == "released"
    assert served.tasks_of(token, lease["id"])[0]["state"] == "cancelled"


def test_wl_run_json_env_and_files(agent_runs_tasks: Served, tmp_path: Path) -> None:
    served = agent_runs_tasks
    token = served.tenant()
    local = tmp_path / "input.txt"
    local.write_text("from a file\n")
    result = wl(
        served,
        token,
        "run",
        POOL,
        "--json",
        "--env",
        "GREETING=hi there",
        "--file",
        f"{local}:data/in.txt",
        "--",
        'echo "$GREETING"; cat data/in.txt; exit 4',
    )
    assert result.returncode == 4, result.stderr
    report = json.loads(result.stdout)
    assert report["exit_code"] == 4 and report["state"] == "failed"
    assert report["log"] == "hi there\nfrom a file\n"
    assert report["lease"]["pool"] == POOL
    assert served.lease(token, report["lease"]["id"])["state"] == "released"


def test_sdk_run_with_files_and_a_log_that_follows(agent_runs_tasks: Served) -> None:
    served = agent_runs_tasks
    token = served.tenant()
    chunks: list[str] = []
    with Client(served.url, token) as client, client.lease(POOL, wait=120) as lease:
        result = lease.run(
            "cat deploy.yaml; printf 'é%.0s' 1 2 3",
            files={"deploy.yaml": b"kind: Deployment\n"},
            on_output=chunks.append,
        )
        assert (result.exit_code, result.state) == (0, "succeeded")
        assert result.log == "kind: Deployment\nééé"
        assert "".join(chunks) == result.log
        task = lease.submit("echo one; sleep 60")
        task.cancel()
        assert task.wait(timeout=120).state == "cancelled"


def test_the_readme_examples_work_as_written(agent_runs_tasks: Served, tmp_path: Path) -> None:
    served = agent_runs_tasks
    token = served.tenant()
    readme = (Path(__file__).resolve().parents[2] / "client" / "README.md").read_text()
    python_block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    wl_run = next(
        line for line in readme.splitlines() if line.startswith("wl run hosted-ubuntu -- '")
    )
    env = {**os.environ, "WORKERLEASE_URL": served.url, "WORKERLEASE_TOKEN": token}
    (tmp_path / "example.py").write_text(python_block)
    sdk = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert sdk.returncode == 0, sdk.stderr
    assert sdk.stdout.startswith("3 failed\nhello from "), sdk.stdout
    env["PATH"] = f"{Path(WL).parent}:{env['PATH']}"
    shell = subprocess.run(
        ["bash", "-c", wl_run], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.startswith("hello from "), shell.stdout
    assert all(lease["state"] == "released" for lease in served.leases(token))
