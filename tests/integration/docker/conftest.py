"""Fixtures for the Docker provisioner against a real engine.

The engine is required, not optional: without one these tests fail with the reason
(run ``.ci/ensure-docker`` first); they never skip. Every test works under its own
deployment id and every container and network labelled with it is removed afterwards.

Servers the agents call back (the fake service, the live service) listen on 0.0.0.0
with a 127.0.0.1 URL, as ``serve --host 0.0.0.0`` does for docker pools: the
provisioner hands the agents the bridge gateway's address instead.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import docker
import pytest

from images.build import ImageBuildError, build_image
from provisioners.base import LABEL_DEPLOYMENT, LABEL_WORKER, WorkerSpec
from provisioners.docker import DockerOptions, DockerProvisioner

POOL = "docker-test"


def containers_of(engine: docker.DockerClient, deployment: str) -> dict[str, str]:
    """Worker id -> container status, from the engine's own listing.

    ``ignore_removed``: the listing inspects each container after listing it, and the
    service may remove one in between; that container is gone, not an error.
    """
    found = engine.containers.list(
        all=True, ignore_removed=True, filters={"label": f"{LABEL_DEPLOYMENT}={deployment}"}
    )
    return {c.labels[LABEL_WORKER]: c.status for c in found}


def docker_pool(image: str, **options: Any) -> dict[str, Any]:
    """A pool entry for the live service: ``hosted-ubuntu`` on ``image``, default isolation."""
    return {
        "name": "hosted-ubuntu",
        "os": "ubuntu",
        "provisioner": "docker",
        "min_ready": 1,
        "max_workers": 3,
        "provision_timeout": "2m",
        "options": {"image": image, "pull": "never", **options},
    }


def remove_containers(engine: docker.DockerClient, deployment: str) -> None:
    """Remove every container of the deployment, also those already going away."""
    for container in engine.containers.list(
        all=True, ignore_removed=True, filters={"label": f"{LABEL_DEPLOYMENT}={deployment}"}
    ):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)


def remove_networks(engine: docker.DockerClient, deployment: str) -> None:
    """Remove the deployment's networks (the provisioner makes them); containers go first."""
    for network in engine.networks.list(filters={"label": f"{LABEL_DEPLOYMENT}={deployment}"}):
        with contextlib.suppress(docker.errors.NotFound):
            network.remove()


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.DockerClient]:
    """A client on the running engine; fails the test run when there is none."""
    try:
        info = subprocess.run(
            ["docker", "info"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"docker info could not run ({exc}); run .ci/ensure-docker", pytrace=False)
    if info.returncode != 0:
        reason = (info.stderr or info.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.fail(f"no Docker engine: {reason[0]}; run .ci/ensure-docker", pytrace=False)
    client = docker.from_env()
    yield client
    client.close()


@pytest.fixture(scope="session")
def testing_image(docker_engine: docker.DockerClient) -> str:
    """The id of ``workerlease/testing:<version>`` as built from this checkout.

    The id, not the tag: other checkouts on the same engine build the same tag from
    their own Dockerfile, and a rebuild there must not change the image under a run.
    """
    try:
        tag = build_image("testing")
    except ImageBuildError as exc:
        pytest.fail(f"cannot build images/testing: {exc}", pytrace=False)
    image_id: str = docker_engine.images.get(tag).id
    return image_id


@dataclass
class ReadyCall:
    worker_id: str
    authorization: str
    body: dict[str, Any]


@dataclass
class FakeService:
    """Stands in for workerlease's ready endpoint: records calls, hands out tokens."""

    url: str = ""
    refused_token: str = "refuse-me"  # answered with 403, so the agent gives up and exits
    calls: dict[str, ReadyCall] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def access_token(self, worker_id: str) -> str:
        return f"access-{worker_id}"

    def wait_ready(self, worker_id: str, timeout: float = 120.0) -> ReadyCall:
        with self.cond:
            if not self.cond.wait_for(lambda: worker_id in self.calls, timeout):
                raise AssertionError(f"no ready callback from {worker_id} in {timeout}s")
            return self.calls[worker_id]


@pytest.fixture
def fake_service() -> Iterator[FakeService]:
    service = FakeService()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            parts = self.path.strip("/").split("/")
            if len(parts) != 4 or parts[:2] != ["v1", "workers"] or parts[3] != "ready":
                self._answer(404, {"title": "not found"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            auth = self.headers.get("Authorization", "")
            if auth == f"Bearer {service.refused_token}":
                self._answer(403, {"title": "bad bootstrap token"})
                return
            with service.cond:
                service.calls[parts[2]] = ReadyCall(parts[2], auth, body)
                service.cond.notify_all()
            self._answer(200, {"access_token": service.access_token(parts[2])})

        def _answer(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", 0), Handler)
    service.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield service
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def new_deployment(docker_engine: docker.DockerClient) -> Iterator[Callable[[], str]]:
    """Make unique deployment ids; remove every container labelled with one afterwards."""
    made: list[str] = []

    def make() -> str:
        deployment = f"wltest-{uuid.uuid4().hex[:12]}"
        made.append(deployment)
        return deployment

    yield make
    for deployment in made:
        remove_containers(docker_engine, deployment)
        remove_networks(docker_engine, deployment)


@pytest.fixture
def deployment(new_deployment: Callable[[], str]) -> str:
    return new_deployment()


@pytest.fixture
def make_provisioner(
    testing_image: str,
) -> Iterator[Callable[..., DockerProvisioner]]:
    """``make_provisioner(**options)``: a provisioner on the testing image by default."""
    made: list[DockerProvisioner] = []

    def make(**options: Any) -> DockerProvisioner:
        options.setdefault("image", testing_image)
        provisioner = DockerProvisioner(POOL, DockerOptions.model_validate(options))
        made.append(provisioner)
        return provisioner

    yield make
    for provisioner in made:
        provisioner.close()


@pytest.fixture
def make_spec(fake_service: FakeService) -> Callable[..., WorkerSpec]:
    def make(deployment: str, **overrides: Any) -> WorkerSpec:
        values: dict[str, Any] = {
            "worker_id": f"w-{uuid.uuid4().hex[:12]}",
            "pool": POOL,
            "os": "linux",
            "deployment_id": deployment,
            "service_url": fake_service.url,
            "bootstrap_token": f"boot-{uuid.uuid4().hex}",
        }
        values.update(overrides)
        return WorkerSpec(**values)

    return make
