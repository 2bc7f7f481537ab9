"""The whole service on a Docker pool against the real engine: lease, run, release, refill.

The service runs on a real HTTP server listening on 0.0.0.0 with a 127.0.0.1 URL, as
``serve --host 0.0.0.0`` does: the containers sit on their deployment's bridge network
and their agents call back at its gateway address. The scheduler's passes are run by
the test.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import requests

from provisioners.base import LABEL_DEPLOYMENT, LABEL_WORKER
from tests.integration.docker.conftest import containers_of, docker_pool
from tests.support.live import LiveService, live_service

pytestmark = [pytest.mark.integration, pytest.mark.docker]


@pytest.fixture
def live(tmp_path: Path, testing_image: str, deployment: str) -> Iterator[LiveService]:
    with live_service(
        f"sqlite:///{tmp_path / 'wl.db'}", [docker_pool(testing_image)], deployment, host="0.0.0.0"
    ) as service:
        yield service


def test_docker_worker_is_leased_runs_a_script_and_is_removed_on_release(
    live: LiveService, docker_engine: docker.DockerClient, deployment: str
) -> None:
    live.tick_until(lambda: live.pool_counts("hosted-ubuntu")["ready"] >= 1)
    token = live.tenant_token()
    lease = live.call("POST", "/v1/leases", token, json={"pool": "hosted-ubuntu"}).json()
    assert lease["state"] == "active"
    worker = lease["worker"]
    assert containers_of(docker_engine, deployment)[worker["id"]] == "running"

    run = requests.post(
        f"{worker['agent_url']}/run",
        timeout=30,
        headers={"Authorization": f"Bearer {worker['access_token']}"},
        json={"script": "echo in-container; cat /etc/debian_version"},
    )
    assert run.status_code == 200
    assert run.json()["exit_code"] == 0
    assert "in-container" in run.json()["stdout"]
    assert (
        requests.post(
            f"{worker['agent_url']}/run",
            json={"script": "id"},
            timeout=30,
            headers={"Authorization": "Bearer wrong"},
        ).status_code
        == 401
    )

    released = live.call("DELETE", f"/v1/leases/{lease['id']}", token).json()
    assert released["state"] == "released"
    live.tick_until(lambda: worker["id"] not in containers_of(docker_engine, deployment))
    # Refill: a new container, never the released one.
    live.tick_until(lambda: live.pool_counts("hosted-ubuntu")["ready"] >= 1)
    assert worker["id"] not in containers_of(docker_engine, deployment)
    assert len(containers_of(docker_engine, deployment)) == 1


def test_reconcile_removes_containers_the_database_does_not_know(
    live: LiveService, docker_engine: docker.DockerClient, deployment: str, testing_image: str
) -> None:
    live.tick_until(lambda: live.pool_counts("hosted-ubuntu")["ready"] >= 1)
    stray = docker_engine.containers.run(
        testing_image,
        detach=True,
        network_mode="none",
        name=f"workerlease-w-{os.urandom(10).hex()}",
        labels={
            LABEL_DEPLOYMENT: deployment,
            LABEL_WORKER: "w-" + "0" * 20,
            "workerlease.pool": "hosted-ubuntu",
        },
        entrypoint=["sleep", "300"],
    )
    other = docker_engine.containers.run(
        testing_image,
        detach=True,
        network_mode="none",
        entrypoint=["sleep", "300"],
        labels={LABEL_DEPLOYMENT: deployment + "-other", LABEL_WORKER: "w-" + "1" * 20},
    )
    try:
        live.reconcile()
        remaining = containers_of(docker_engine, deployment)
        assert "w-" + "0" * 20 not in remaining
        assert len(remaining) == 1  # the real, ready worker stays
        other.reload()
        assert other.status == "running"
    finally:
        other.remove(force=True)
        with contextlib.suppress(docker.errors.NotFound):
            stray.remove(force=True)


class SwitchableProxy:
    """A unix-socket proxy to the Docker daemon that the test can switch off ("daemon down")."""

    def __init__(self, path: Path, target: str = "/var/run/docker.sock") -> None:
        self.path, self.target = path, target
        self.up = threading.Event()
        self.up.set()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(64)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[SwitchableProxy]:
    proxy = SwitchableProxy(Path("/tmp") / f"wl-docker-{os.urandom(4).hex()}.sock")
    yield proxy
    proxy.close()
    proxy.path.unlink(missing_ok=True)


def test_leasing_ready_workers_keeps_working_while_the_daemon_is_down(
    tmp_path: Path,
    testing_image: str,
    deployment: str,
    proxy: SwitchableProxy,
    docker_engine: docker.DockerClient,
) -> None:
    pool = docker_pool(testing_image, docker_host=f"unix://{proxy.path}")
    pool["min_ready"] = 2
    with live_service(
        f"sqlite:///{tmp_path / 'wl.db'}", [pool], deployment, host="0.0.0.0"
    ) as live:
        live.tick_until(lambda: live.pool_counts("hosted-ubuntu")["ready"] >= 2)
        proxy.up.clear()  # the daemon "goes away"
        token = live.tenant_token()
        lease = live.call("POST", "/v1/leases", token, json={"pool": "hosted-ubuntu"})
        assert lease.status_code == 201
        leased_id = lease.json()["worker"]["id"]
        live.call("DELETE", f"/v1/leases/{lease.json()['id']}", token)
        live.tick()  # destroy and refill both fail against the dead daemon, and are counted
        metrics = requests.get(live.url + "/metrics", timeout=10).text
        assert 'workerlease_provisioner_errors_total{kind="DockerUnavailableError"' in metrics
        assert leased_id in containers_of(docker_engine, deployment)  # not yet destroyed

        proxy.up.set()  # back: the destroy is retried (after its backoff) and the pool refills

        def converged() -> bool:
            containers = containers_of(docker_engine, deployment)
            return leased_id not in containers and live.pool_counts("hosted-ubuntu")["ready"] >= 2

        live.tick_until(converged, timeout_s=180, every_s=1)


def test_pool_with_missing_image_is_degraded_not_crashing(
    tmp_path: Path, deployment: str, docker_engine: docker.DockerClient
) -> None:
    pool = docker_pool("workerlease/does-not-exist:0", pull="never")
    with live_service(
        f"sqlite:///{tmp_path / 'wl.db'}", [pool], deployment, host="0.0.0.0"
    ) as live:
        live.tick()
        pools = live.call("GET", "/v1/admin/pools").json()["pools"]
        assert "ImageNotFoundError" in (pools[0]["degraded_reason"] or "")
        assert containers_of(docker_engine, deployment) == {}
        assert live.call("GET", "/healthz").status_code == 200
