"""kill -9 of the whole service while containers are being created, then restart.

After the restart, reconcile removes every container the database does not know,
the containers equal the workers the database holds live, and once all leases end and
the pool is emptied nothing labelled for the deployment is left behind.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from provisioners.base import LABEL_DEPLOYMENT, LABEL_WORKER
from tests.integration.docker.conftest import containers_of, remove_containers, remove_networks
from tests.support.server import ServerProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.docker]

POOL = "hosted-ubuntu"


def live_rows(db_path: Path) -> dict[str, str]:
    with sqlite3.connect(db_path, timeout=10) as connection:
        rows = connection.execute(
            "SELECT id, state FROM workers WHERE state <> 'destroyed'"
        ).fetchall()
    connection.close()
    return dict(rows)


@pytest.fixture
def server(
    tmp_path: Path, testing_image: str, docker_engine: docker.DockerClient
) -> Iterator[ServerProcess]:
    docker_pool = {
        "name": POOL,
        "os": "ubuntu",
        "provisioner": "docker",
        "min_ready": 1,
        "max_workers": 8,
        "provision_timeout": "30s",
        "options": {"image": testing_image, "pull": "never"},
    }
    server = ServerProcess(
        tmp_path, pools=[docker_pool], scheduler={"reconcile_interval": "3s"}, host="0.0.0.0"
    )
    yield server
    server.close()
    remove_containers(docker_engine, server.deployment_id)
    remove_networks(docker_engine, server.deployment_id)


def test_kill9_while_creating_containers_then_restart_leaves_nothing_behind(
    server: ServerProcess, docker_engine: docker.DockerClient, testing_image: str
) -> None:
    server.start()
    token = server.create_tenant("acme")["token"]
    server.wait_ready_workers(1, timeout=120)
    lease = server.request("POST", "/v1/leases", token=token, json={"pool": POOL})
    assert lease.status_code == 201, lease.text
    leased_worker = lease.json()["worker"]["id"]
    assert server.admin("PATCH", f"/v1/admin/pools/{POOL}", json={"min_ready": 6}).ok

    def creating() -> bool:
        rows = live_rows(server.db_path)
        return list(rows.values()).count("provisioning") >= 2

    wait_until(creating, 120, interval=0.02, message="the pool never started filling")
    server.kill()
    deployment = server.deployment_id
    assert leased_worker in containers_of(docker_engine, deployment)  # containers outlive it

    # A container the database never knew (as if created by a request lost in the crash).
    stray = docker_engine.containers.run(
        testing_image,
        detach=True,
        network_mode="none",
        entrypoint=["sleep", "300"],
        name=f"workerlease-w-{'a' * 20}",
        labels={
            LABEL_DEPLOYMENT: deployment,
            LABEL_WORKER: "w-" + "a" * 20,
            "workerlease.pool": POOL,
        },
    )
    assert stray.status in ("created", "running")

    server.start()

    def converged() -> bool:
        rows = live_rows(server.db_path)
        running = containers_of(docker_engine, deployment)
        return (
            set(running) == set(rows)
            and set(rows.values()) <= {"ready", "leased"}
            and list(rows.values()).count("ready") >= 6
        )

    wait_until(
        converged,
        240,
        interval=1,
        message=lambda: (
            f"db={live_rows(server.db_path)} containers={containers_of(docker_engine, deployment)}"
            f"\n{server.log_tail()}"
        ),
    )
    assert "w-" + "a" * 20 not in containers_of(docker_engine, deployment)
    after = server.request("GET", f"/v1/leases/{lease.json()['id']}", token=token).json()
    assert after["state"] == "active" and after["worker"]["id"] == leased_worker

    # All leases end and the pool empties: nothing labelled for the deployment remains.
    server.request("DELETE", f"/v1/leases/{lease.json()['id']}", token=token)
    assert server.admin("PATCH", f"/v1/admin/pools/{POOL}", json={"min_ready": 0}).ok
    wait_until(
        lambda: not containers_of(docker_engine, deployment) and not live_rows(server.db_path),
        180,
        interval=1,
        message=lambda: f"left: {containers_of(docker_engine, deployment)}",
    )
