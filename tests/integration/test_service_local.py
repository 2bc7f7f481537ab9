"""End to end: a real ``workerlease serve`` with real local agent processes, over HTTP.

Each test starts the service as a subprocess (tests/support/server.py) on a free
127.0.0.1 port with its own SQLite file and deployment id, and checks what a
user or an operator would see: HTTP answers, agent processes in /proc, their
working directories, and the exit of the service itself.
"""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from provisioners.base import ResourceState, WorkerSpec
from provisioners.local import LocalOptions, LocalProvisioner
from tests.support.server import (
    ServerProcess,
    free_port,
    local_processes,
    pool,
    port_listening,
    wait_until,
)

pytestmark = pytest.mark.integration

POOL = "hosted-ubuntu"


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    servers: list[ServerProcess] = []

    def make(**kwargs: Any) -> ServerProcess:
        server = ServerProcess(tmp_path / f"s{len(servers)}", **kwargs)
        servers.append(server)
        return server

    for directory in range(4):
        (tmp_path / f"s{directory}").mkdir()
    yield make
    for server in servers:
        server.close()


def lease(
    server: ServerProcess, token: str, wait_seconds: int = 0, pool_name: str = POOL
) -> requests.Response:
    return server.request(
        "POST",
        "/v1/leases",
        token=token,
        json={"pool": pool_name, "wait_seconds": wait_seconds},
        timeout=wait_seconds + 30,
    )


def run_script(worker: dict[str, Any], script: str, token: str | None = None) -> requests.Response:
    return requests.post(
        f"{worker['agent_url'].rstrip('/')}/run",
        json={"script": script, "timeout_s": 20},
        headers={"Authorization": f"Bearer {token or worker['access_token']}"},
        timeout=30,
    )


def live_rows(db_path: Path) -> dict[str, str]:
    """Workers the database holds live (not destroyed): id -> state, read with sqlite3."""
    with sqlite3.connect(db_path, timeout=10) as connection:
        rows = connection.execute(
            "SELECT id, state FROM workers WHERE state <> 'destroyed'"
        ).fetchall()
    connection.close()
    return dict(rows)


def provisioning_rows(db_path: Path) -> list[tuple[str, str | None]]:
    with sqlite3.connect(db_path, timeout=10) as connection:
        rows = connection.execute(
            "SELECT id, provider_id FROM workers WHERE state = 'provisioning'"
        ).fetchall()
    connection.close()
    return [(str(worker_id), provider) for worker_id, provider in rows]


# ---- 1. the README walk-through ------------------------------------------------------


def test_walkthrough_lease_run_release_refill(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(pools=[pool(min_ready=1, max_workers=3)]).start()
    tenant = server.create_tenant("acme")
    token = tenant["token"]

    pools = server.request("GET", "/v1/pools", token=token)
    assert pools.status_code == 200
    assert [p["name"] for p in pools.json()["pools"]] == [POOL]

    server.wait_ready_workers(1)
    response = lease(server, token)
    assert response.status_code == 201, response.text
    leased = response.json()
    assert leased["state"] == "active"
    worker = leased["worker"]
    worker_id = worker["id"]
    assert worker["access_token"] and worker["agent_url"].startswith("http://127.0.0.1:")
    assert worker_id in server.agents()
    workdir = server.workdir(worker_id)
    assert workdir.is_dir()

    result = run_script(worker, "echo hi; pwd")
    assert result.status_code == 200, result.text
    body = result.json()
    assert body["exit_code"] == 0
    assert "hi" in body["stdout"]
    assert run_script(worker, "echo hi", token="not-the-access-token").status_code == 401
    assert run_script(worker, "echo hi", token=token).status_code == 401  # tenant token

    released = server.request("DELETE", f"/v1/leases/{leased['id']}", token=token)
    assert released.status_code == 200, released.text
    assert released.json()["state"] == "released"
    assert released.json()["end_reason"] == "released"

    wait_until(
        lambda: worker_id not in server.agents(),
        60,
        message=lambda: f"agent of {worker_id} still running\n{server.log_tail()}",
    )
    wait_until(lambda: not workdir.exists(), 60, message=f"{workdir} not removed")
    wait_until(
        lambda: any(w["id"] == worker_id and w["state"] == "destroyed" for w in server.workers()),
        60,
        message="worker never destroyed",
    )

    def refilled() -> set[str]:
        ready = {w["id"] for w in server.workers("ready")}
        return ready if ready and worker_id not in ready else set()

    fresh = wait_until(refilled, 60, message=lambda: f"no refill: {server.workers()}")
    assert fresh <= set(server.agents())


# ---- 2. pending, then active -----------------------------------------------------------


def test_lease_on_empty_pool_waits_for_a_new_worker(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server(pools=[pool(min_ready=0, max_workers=2)]).start()
    token = server.create_tenant("acme")["token"]
    assert server.pool_counts()["ready"] == 0
    assert server.agents() == {}

    response = lease(server, token, wait_seconds=20)
    assert response.status_code in (201, 202), response.text
    body = response.json()
    if response.status_code == 202:
        assert body["state"] == "pending" and body["worker"] is None
        assert response.headers.get("Location")

        def active() -> dict[str, Any] | None:
            got = server.request("GET", f"/v1/leases/{body['id']}", token=token).json()
            return got if got["state"] == "active" else None

        # A bound on a hang only (no speed target): a lease that waits for the pending
        # timeout (30 min) fails it; a slow machine does not.
        body = wait_until(active, 90, message="lease never active")
    assert body["state"] == "active"
    worker = body["worker"]
    assert worker["id"] in server.agents()
    result = run_script(worker, "echo on-demand")
    assert result.status_code == 200 and "on-demand" in result.json()["stdout"]


def test_a_queued_lease_rings_the_scheduler_instead_of_waiting_for_its_poll(
    make_server: Callable[..., ServerProcess],
) -> None:
    # Every poll a minute away: only the doorbell can get this lease a worker in time.
    server = make_server(
        pools=[pool(min_ready=0, max_workers=1)],
        scheduler={"interval": "60s", "demand_interval": 60},
    ).start()
    token = server.create_tenant("acme")["token"]
    wait_until(
        lambda: "scheduler_started" in server.log_text(),
        60,
        message=lambda: f"scheduler never started:\n{server.log_tail()}",
    )

    response = lease(server, token, wait_seconds=30)

    assert response.status_code == 201, response.text
    assert response.json()["state"] == "active"
    assert response.json()["worker"]["id"] in server.agents()


def test_a_warm_take_rings_the_scheduler_and_the_pool_refills_before_its_next_pass(
    make_server: Callable[..., ServerProcess],
) -> None:
    # Every poll a minute away: only the doorbell can start the replacement in time.
    server = make_server(
        pools=[pool(min_ready=1, max_workers=2)],
        scheduler={"interval": "60s", "demand_interval": 60},
    ).start()
    token = server.create_tenant("acme")["token"]
    server.wait_ready_workers(1, timeout=90)
    wait_until(
        lambda: "scheduler_started" in server.log_text(),
        60,
        message=lambda: f"scheduler never started:\n{server.log_tail()}",
    )

    taken = lease(server, token)
    assert taken.status_code == 201, taken.text

    # A bound on a hang (the next full pass is 60 s away), not a speed target.
    counts = server.wait_ready_workers(1, timeout=45)
    assert counts["leased"] == 1
    replacement = [w for w in server.workers("ready") if w["id"] != taken.json()["worker"]["id"]]
    assert replacement and replacement[0]["id"] in server.agents()


# ---- 3. reconcile removes an agent the database does not know --------------------------


def test_reconcile_destroys_unknown_agent(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(
        pools=[pool(min_ready=0, max_workers=2)], scheduler={"reconcile_interval": "2s"}
    ).start()
    stranger = f"w-{uuid.uuid4().hex[:20]}"
    provisioner = LocalProvisioner(POOL, LocalOptions(work_root=str(server.work_root)))
    # The agent calls back to a closed port, so it keeps retrying (it would exit on the
    # service's 404 otherwise) and only the reconcile can make it go away.
    spec = WorkerSpec(
        worker_id=stranger,
        pool=POOL,
        os="ubuntu",
        deployment_id=server.deployment_id,
        service_url=f"http://127.0.0.1:{free_port()}",
        bootstrap_token="b" * 43,
    )
    handle = provisioner.create(spec)
    pid = int(handle.provider_id)
    try:
        # No look at the agent before the reconcile: a pass (every 2 s) may kill it at any
        # moment from here on. That it ran is proven by what persists: the pid the
        # provisioner started, and the service's own log naming it.
        def destroyed() -> bool:
            # The service kills the agent, then removes its directory, then logs (about
            # 200 ms from first to last here): wait for all three, never assert in
            # between. Our provisioner started the agent, so describe() also reaps it:
            # GONE means gone from /proc, not a zombie.
            return (
                provisioner.describe([handle])[stranger] == ResourceState.GONE
                and not server.workdir(stranger).exists()
                and f"local_agent_destroyed worker={stranger}" in server.log_text()
            )

        wait_until(
            destroyed,
            60,
            message=lambda: (
                f"unknown agent {stranger} (pid {pid}) not destroyed: "
                f"agents={server.agents()} dir={server.workdir(stranger).exists()}\n"
                f"{server.log_tail()}"
            ),
        )
        assert stranger not in server.agents()
        orphans = [line for line in server.log_text().splitlines() if "orphans_found" in line]
        assert any(stranger in line for line in orphans), server.log_tail()
        assert stranger not in {w["id"] for w in server.workers("all")}
        assert server.request("GET", "/readyz").status_code == 200
    finally:
        provisioner.destroy(handle)  # idempotent: kills and reaps it if the test failed early


# ---- 4. kill -9 while filling, restart on the same database --------------------------


def test_kill9_while_filling_then_restart_converges(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server(
        pools=[pool(min_ready=1, max_workers=6, provision_timeout="15s")],
        scheduler={"reconcile_interval": "3s"},
    )
    server.start()
    token = server.create_tenant("acme")["token"]
    server.wait_ready_workers(1)
    response = lease(server, token)
    assert response.status_code == 201, response.text
    before = response.json()
    leased_worker = before["worker"]["id"]
    server.wait_ready_workers(1)  # the replacement, so the fill below is all new
    patched = server.admin("PATCH", f"/v1/admin/pools/{POOL}", json={"min_ready": 4})
    assert patched.status_code == 200, patched.text

    def filling() -> list[tuple[str, str | None]]:
        """Provisioning rows once at least one has an agent started (kill point)."""
        rows = provisioning_rows(server.db_path)
        return rows if any(provider for _, provider in rows) else []

    at_kill = wait_until(filling, 60, interval=0.02, message="the pool never started filling")
    server.kill()  # master, web worker and scheduler at once, mid-fill
    assert server.process is not None and server.process.returncode == -9
    assert not port_listening(server.port)
    assert leased_worker in server.agents()  # agents outlive the service

    server.start()

    def settled() -> dict[str, str] | None:
        """The live rows, once they equal the agents and the API's live workers."""
        rows = live_rows(server.db_path)
        agents = set(server.agents())
        api_live = {w["id"] for w in server.workers("live")}
        states = list(rows.values())
        if (
            set(states) <= {"ready", "leased"}
            and set(rows) == agents == api_live
            and states.count("ready") >= 4
            and live_rows(server.db_path) == rows  # not moved while we looked
        ):
            return rows
        return None

    # Asserted on the snapshot that settled, not on a second look that may catch a trim.
    rows = wait_until(
        settled,
        120,
        interval=0.5,
        message=lambda: (
            f"not settled (provisioning at kill {at_kill}): db={live_rows(server.db_path)} "
            f"agents={sorted(server.agents())}\n{server.log_tail()}"
        ),
    )

    after = server.request("GET", f"/v1/leases/{before['id']}", token=token).json()
    assert after["state"] == "active"
    assert after["worker"]["id"] == leased_worker
    assert rows[leased_worker] == "leased"
    with sqlite3.connect(server.db_path, timeout=10) as connection:
        doubled = connection.execute(
            "SELECT worker_id, count(*) FROM leases WHERE worker_id IS NOT NULL "
            "GROUP BY worker_id HAVING count(*) > 1"
        ).fetchall()
    connection.close()
    assert doubled == []
    result = run_script(after["worker"], "echo survived")
    assert result.status_code == 200 and "survived" in result.json()["stdout"]


# ---- 5. SIGTERM exits cleanly and leaves state behind ---------------------------------


def test_sigterm_exits_cleanly_and_keeps_leases(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(pools=[pool(min_ready=1, max_workers=3)]).start()
    token = server.create_tenant("acme")["token"]
    server.wait_ready_workers(1)
    response = lease(server, token)
    assert response.status_code == 201, response.text
    lease_id = response.json()["id"]
    worker = response.json()["worker"]

    # stop() SIGKILLs after its timeout, so a hang shows as -9; 60 s bounds a hang only.
    code = server.stop(timeout=60)
    assert code == 0, server.log_tail()
    assert not port_listening(server.port)
    rows = live_rows(server.db_path)
    assert rows.get(worker["id"]) == "leased"
    assert worker["id"] in server.agents()  # workers are left running for the next start

    server.start()
    after = server.request("GET", f"/v1/leases/{lease_id}", token=token)
    assert after.status_code == 200
    assert after.json()["state"] == "active"
    assert after.json()["worker"]["id"] == worker["id"]
    result = run_script(worker, "echo still-here")
    assert result.status_code == 200 and "still-here" in result.json()["stdout"]


def test_a_stopping_serve_answers_a_waiting_poll_once_and_takes_no_new_one(
    make_server: Callable[..., ServerProcess],
) -> None:
    """A client that polls again the moment it is answered (as agents do) gets one answer
    from a stopping serve, not a tight loop of them until gunicorn's next 1 s tick."""
    server = make_server(pools=[pool(min_ready=1, max_workers=1)]).start()
    server.wait_ready_workers(1)
    assert lease(server, server.create_tenant("holder")["token"]).status_code == 201
    waiter = server.create_tenant("waiter")["token"]
    pending = lease(server, waiter)
    assert pending.status_code == 202, pending.text
    url = f"{server.url}/v1/leases/{pending.json()['id']}"
    answered: list[float] = []  # when each poll was answered
    ended: list[BaseException] = []

    def poll_again_and_again() -> None:
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {waiter}"
            deadline = time.monotonic() + 120
            while len(answered) < 2000 and time.monotonic() < deadline:
                try:
                    session.get(url, params={"wait_seconds": 30}, timeout=60)
                except requests.RequestException as exc:
                    ended.append(exc)
                    return
                answered.append(time.monotonic())

    poller = threading.Thread(target=poll_again_and_again, daemon=True)
    poller.start()
    wait_until(
        lambda: "workerlease_waiting_requests 1.0" in server.request("GET", "/metrics").text,
        60,
        message="the poll never waited",
    )
    stopped_at = time.monotonic()
    assert server.stop(timeout=60) == 0, server.log_tail()
    poller.join(90)
    assert ended, "the poller never saw the service go"
    after_stop = [at for at in answered if at >= stopped_at]
    # The waiting poll is answered at once, and the one sent right after it on the same
    # kept-alive connection (with "Connection: close"); then no new connection is taken.
    assert len(after_stop) <= 2, (len(after_stop), ended)


# ---- 6. idle expiry ----------------------------------------------------------------------


def test_idle_expiry_end_to_end(make_server: Callable[..., ServerProcess]) -> None:
    # 10 s, not less: the busy lease is renewed about every second and must never go idle
    # for that long even when a renew is slow on a loaded machine.
    server = make_server(pools=[pool(min_ready=2, max_workers=4, lease_idle_timeout="10s")]).start()
    idle = server.create_tenant("idle")["token"]
    busy = server.create_tenant("busy")["token"]
    server.wait_ready_workers(2)
    first = lease(server, idle)
    second = lease(server, busy)
    assert first.status_code == 201 and second.status_code == 201, (first.text, second.text)
    idle_lease, busy_lease = first.json(), second.json()
    idle_worker = idle_lease["worker"]["id"]

    def renew_busy() -> None:
        renewed = server.request("POST", f"/v1/leases/{busy_lease['id']}/renew", token=busy)
        assert renewed.status_code == 200, renewed.text
        assert renewed.json()["state"] == "active"

    # Renew the busy lease until the idle one has ended: the outcome, not a fixed sleep.
    deadline = time.monotonic() + 90
    while True:
        renew_busy()
        got = server.request("GET", f"/v1/leases/{idle_lease['id']}", token=idle).json()
        if got["state"] != "active":
            break
        assert time.monotonic() < deadline, f"idle lease never expired\n{server.log_tail()}"
        time.sleep(1)
    assert got["state"] == "expired"
    assert got["end_reason"] == "idle_timeout"
    # The renewed one is still active on its agent, checked now: after the wait below it
    # could have gone idle itself.
    renew_busy()
    still = server.request("GET", f"/v1/leases/{busy_lease['id']}", token=busy).json()
    assert still["state"] == "active"
    assert still["worker"]["id"] in server.agents()

    wait_until(
        lambda: idle_worker not in server.agents(),
        60,
        message=lambda: f"agent of expired lease still running\n{server.log_tail()}",
    )
    assert (
        server.request("POST", f"/v1/leases/{idle_lease['id']}/renew", token=idle).status_code
        == 409
    )


# ---- 7. bad config refused at start ----------------------------------------------------


@pytest.mark.parametrize("case", ["missing_admin_token", "unknown_key"])
def test_serve_refuses_bad_config(make_server: Callable[..., ServerProcess], case: str) -> None:
    if case == "missing_admin_token":
        server = make_server(admin_token=None)
        key = "admin_token"
    else:
        server = make_server(scheduler={"intervall": "1s"})
        key = "scheduler.intervall"
    # It must exit, not serve: the timeout bounds a hang only (no speed target).
    completed = subprocess.run(
        server.command(),
        env=server.env(),
        cwd=server.dir,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode != 0
    stderr = completed.stderr.decode()
    assert key in stderr, stderr
    assert "Traceback" not in stderr
    assert not port_listening(server.port)
    assert local_processes(server.deployment_id, agents_only=False) == {}


def test_two_services_sharing_a_deployment_id_leave_each_others_workers_alone(
    make_server: Callable[..., ServerProcess],
) -> None:
    """Each has its own database; a shared deployment_id used to mean mutual destruction."""
    first = make_server(
        pools=[pool(min_ready=2, max_workers=2)], scheduler={"reconcile_interval": "2s"}
    ).start()
    first.wait_ready_workers(2)
    first_workers = {w["id"] for w in first.workers("ready")}
    second = make_server(
        pools=[pool(min_ready=1, max_workers=1)],
        scheduler={"reconcile_interval": "2s"},
        deployment_id=first.deployment_id,
    ).start()
    second.wait_ready_workers(1)
    second_workers = {w["id"] for w in second.workers("ready")}

    # Both reconcile several times while the other's agents run, and say so.
    for server in (first, second):
        wait_until(
            lambda server=server: server.log_text().count("foreign_resources_found") >= 2,
            120,
            message=lambda server=server: f"no foreign resources seen\n{server.log_tail()}",
        )
    agents = first.agents()
    assert first_workers | second_workers <= set(agents)
    assert {w["id"] for w in first.workers("ready")} == first_workers
    assert {w["id"] for w in second.workers("ready")} == second_workers
