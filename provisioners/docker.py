"""Docker provisioner: one container per worker on a Docker engine.

A worker is a container named ``workerlease-<worker id>``, labelled with the
deployment, pool and worker id, whose entry point is the worker agent (see
``images/``). The container is the resource: ``create`` launches it, ``destroy``
removes it with force, and ``list_owned`` finds every container labelled with the
deployment, including exited ones.

Networking. With ``network: host`` (the default) the agent shares the host's
loopback: it binds 127.0.0.1 and calls the service's 127.0.0.1 URL as is. With a
named network the agent binds all interfaces inside the container and its port is
published on the host's 127.0.0.1 only, on the same port number so the URL the agent
advertises is the one the service can reach; a loopback service URL is rewritten to
``host.docker.internal`` (the engine's host gateway), so the service must then also
listen on an address that network can reach.

This module imports the docker SDK at its top; the registry loads it only when a pool
uses ``docker``, so the core never needs the SDK.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, NoReturn
from urllib.parse import urlsplit, urlunsplit

import docker
import requests
from docker import errors as docker_errors
from docker.models.containers import Container
from pydantic import Field, field_validator

from provisioners.base import (
    LABEL_DEPLOYMENT,
    LABEL_POOL,
    LABEL_WORKER,
    CapacityError,
    PermanentProvisionerError,
    Provisioner,
    ProvisionerOptions,
    ResourceState,
    TransientProvisionerError,
    WorkerHandle,
    WorkerSpec,
)

log = logging.getLogger(__name__)

CONTAINER_PREFIX = "workerlease-"
HOST_GATEWAY_NAME = "host.docker.internal"
DOCKER_HOST_SCHEMES = ("unix", "tcp", "ssh", "npipe", "http", "https")
# How long a name conflict may take to show the container that won it.
CONFLICT_WAIT_S = 10.0

# Container states as the engine names them -> what the service needs to know.
# ``paused`` still holds the resource but its agent cannot answer: not RUNNING yet.
STATE_MAP: dict[str, ResourceState] = {
    "created": ResourceState.PENDING,
    "restarting": ResourceState.PENDING,
    "paused": ResourceState.PENDING,
    "running": ResourceState.RUNNING,
}  # exited, dead, removing, missing -> GONE

# Words the engine uses when the machine, not the request, is short of something.
CAPACITY_FRAGMENTS = (
    "no space left on device",
    "cannot allocate memory",
    "out of memory",
    "resource temporarily unavailable",
    "too many open files",
    "port is already allocated",
    "address already in use",
)


class DockerUnavailableError(TransientProvisionerError):
    """The Docker engine could not be reached (not running, restarting, wrong host)."""


class ImageNotFoundError(PermanentProvisionerError):
    """The worker image is not on the engine and could not (or may not) be pulled."""


class DockerOptions(ProvisionerOptions):
    """A docker pool's ``options``."""

    image: str = Field(min_length=1, description="Worker image, e.g. workerlease/testing:0.1.0")
    docker_host: str | None = Field(
        None, description="Engine URL (unix://, tcp://, ssh://); default: DOCKER_HOST as usual"
    )
    network: str = Field("host", min_length=1, description="'host' or a Docker network name")
    cpus: float | None = Field(None, gt=0, description="CPU limit, e.g. 1.5")
    memory: str | None = Field(
        None, pattern=r"^[0-9]+[bkmgBKMG]?$", description="Memory limit, e.g. 512m"
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra agent environment")
    privileged: bool = False
    pull: Literal["never", "missing", "always"] = "missing"
    platform: str | None = Field(None, description="e.g. linux/amd64")
    agent_port: int = Field(0, ge=0, le=65535, description="0: any free port")

    @field_validator("docker_host")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in DOCKER_HOST_SCHEMES:
            raise ValueError(f"must start with one of {', '.join(DOCKER_HOST_SCHEMES)}://")
        return value


def container_name(worker_id: str) -> str:
    return f"{CONTAINER_PREFIX}{worker_id}"


class DockerProvisioner(Provisioner[DockerOptions]):
    name = "docker"
    Options = DockerOptions

    def __init__(self, pool: str, options: DockerOptions) -> None:
        super().__init__(pool, options)
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()

    # -- the four verbs ------------------------------------------------------------

    def create(self, spec: WorkerSpec) -> WorkerHandle:
        name = container_name(spec.worker_id)
        with self._translated(f"create {name}"):
            existing = self._get_container(name)
            if existing is None:
                try:
                    existing = self._create_container(spec, name)
                except docker_errors.APIError as exc:
                    if exc.status_code != 409:
                        raise
                    # Another call for the same worker won the race: use its container.
                    existing = self._await_container(name)
                    if existing is None:
                        raise
                    log.info("docker_create_conflict pool=%s worker=%s", spec.pool, spec.worker_id)
            self._check_owner(existing, spec)
            if existing.status == "created":
                # Launched before a crash but never started: finish the job.
                existing.start()
            log.info(
                "docker_worker_created pool=%s worker=%s container=%s",
                spec.pool,
                spec.worker_id,
                existing.short_id,
            )
            return self._handle(spec.worker_id, spec.pool, existing.id)

    def destroy(self, handle: WorkerHandle) -> None:
        target = handle.provider_id or container_name(handle.worker_id)
        with self._translated(f"destroy {target}"):
            try:
                self._docker().api.remove_container(target, force=True)
            except docker_errors.NotFound:
                pass  # already gone: success
            except docker_errors.APIError as exc:
                if not (exc.status_code == 409 and "already in progress" in _explain(exc)):
                    raise
        log.info("docker_worker_destroyed pool=%s worker=%s", handle.pool, handle.worker_id)

    def describe(self, handles: Iterable[WorkerHandle]) -> dict[str, ResourceState]:
        wanted = list(handles)
        if not wanted:
            return {}
        with self._translated("describe"):
            # One list call instead of one inspect per handle; sparse skips the inspects.
            found = self._docker().containers.list(
                all=True, sparse=True, filters={"label": LABEL_WORKER}
            )
        by_id = {c.id: str(c.attrs.get("State", "")) for c in found}
        return {
            h.worker_id: STATE_MAP.get(by_id.get(h.provider_id, ""), ResourceState.GONE)
            for h in wanted
        }

    def list_owned(self, deployment_id: str) -> list[WorkerHandle]:
        with self._translated("list_owned"):
            found = self._docker().containers.list(
                all=True, sparse=True, filters={"label": f"{LABEL_DEPLOYMENT}={deployment_id}"}
            )
        handles = []
        for container in found:
            labels = container.attrs.get("Labels") or {}
            worker_id = labels.get(LABEL_WORKER)
            if worker_id:
                handles.append(self._handle(worker_id, labels.get(LABEL_POOL, ""), container.id))
        return handles

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- helpers -------------------------------------------------------------------

    def _docker(self) -> docker.DockerClient:
        """The engine client, made on first use (one per provisioner, shared by threads)."""
        with self._client_lock:
            if self._client is None:
                if self.options.docker_host:
                    self._client = docker.DockerClient(base_url=self.options.docker_host)
                else:
                    self._client = docker.from_env()
            return self._client

    def _get_container(self, name: str) -> Container | None:
        try:
            return self._docker().containers.get(name)
        except docker_errors.NotFound:
            return None

    def _await_container(self, name: str) -> Container | None:
        """The container that holds ``name``, once the engine shows it.

        The engine reserves a name before the container it belongs to can be looked up,
        so right after a name conflict the winner may still be invisible for a moment.
        """
        deadline = time.monotonic() + CONFLICT_WAIT_S
        while (container := self._get_container(name)) is None:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
        return container

    def _create_container(self, spec: WorkerSpec, name: str) -> Container:
        client = self._docker()
        if self.options.pull == "always":
            self._pull()
        kwargs = self._container_kwargs(spec, name)
        try:
            container = client.containers.create(self.options.image, **kwargs)
        except docker_errors.ImageNotFound:
            if self.options.pull != "missing":
                raise
            self._pull()
            container = client.containers.create(self.options.image, **kwargs)
        try:
            container.start()
        except docker_errors.APIError:
            # A container that cannot start would block the name; remove it so a retry
            # (e.g. after capacity frees up) starts clean.
            container.remove(force=True)
            raise
        return container

    def _container_kwargs(self, spec: WorkerSpec, name: str) -> dict[str, Any]:
        env = spec.agent_environment()
        env.update(self.options.env)
        port = self.options.agent_port or spec.agent_port
        kwargs: dict[str, Any] = {
            "name": name,
            "labels": spec.labels(),
            "detach": True,
            # tini as PID 1: reaps the scripts' orphans and forwards signals to the agent.
            "init": True,
            "privileged": self.options.privileged,
        }
        if self.options.network == "host":
            env["WORKERLEASE_AGENT_HOST"] = "127.0.0.1"
            env["WORKERLEASE_AGENT_PORT"] = str(port)
            kwargs["network_mode"] = "host"
        else:
            # The same port number inside and out, so the advertised URL is reachable.
            port = port or _free_loopback_port()
            env["WORKERLEASE_AGENT_HOST"] = "0.0.0.0"
            env["WORKERLEASE_AGENT_PORT"] = str(port)
            env["WORKERLEASE_AGENT_ADVERTISE_HOST"] = "127.0.0.1"
            env["WORKERLEASE_URL"] = _via_host_gateway(env["WORKERLEASE_URL"])
            kwargs["network"] = self.options.network
            kwargs["ports"] = {f"{port}/tcp": ("127.0.0.1", port)}
            kwargs["extra_hosts"] = {HOST_GATEWAY_NAME: "host-gateway"}
        kwargs["environment"] = env
        if self.options.cpus is not None:
            kwargs["nano_cpus"] = int(self.options.cpus * 1e9)
        if self.options.memory is not None:
            kwargs["mem_limit"] = self.options.memory
        if self.options.platform is not None:
            kwargs["platform"] = self.options.platform
        return kwargs

    def _pull(self) -> None:
        try:
            self._docker().images.pull(self.options.image, platform=self.options.platform)
        except docker_errors.APIError as exc:
            raise ImageNotFoundError(
                f"image {self.options.image!r} is not on the engine and pulling it failed: "
                f"{_explain(exc)}"
            ) from exc

    def _check_owner(self, container: Container, spec: WorkerSpec) -> None:
        labels = container.labels or {}
        if labels.get(LABEL_WORKER) != spec.worker_id:
            raise PermanentProvisionerError(
                f"container {container.name!r} exists but is not labelled as worker "
                f"{spec.worker_id!r}; remove it or use another worker id"
            )

    def _handle(self, worker_id: str, pool: str, container_id: str | None) -> WorkerHandle:
        return WorkerHandle(
            worker_id=worker_id,
            pool=pool,
            provider_id=container_id or "",
            address=_engine_address(self.options.docker_host),
        )

    @contextmanager
    def _translated(self, action: str) -> Iterator[None]:
        """Turn every docker SDK / transport error into the provisioner's own errors."""
        try:
            yield
        except docker_errors.ImageNotFound as exc:
            raise ImageNotFoundError(
                f"{action}: image {self.options.image!r} not found on the engine "
                f"(pull={self.options.pull}): {_explain(exc)}"
            ) from exc
        except docker_errors.APIError as exc:
            _raise_api_error(action, exc)
        except (requests.exceptions.RequestException, docker_errors.DockerException) as exc:
            # Connection refused, socket missing, timeouts, and the SDK's own
            # "Error while fetching server API version" when the client is made.
            raise DockerUnavailableError(
                f"{action}: Docker engine at {self.options.docker_host or 'DOCKER_HOST/default'} "
                f"is unreachable: {exc}"
            ) from exc
        except OSError as exc:
            raise DockerUnavailableError(f"{action}: Docker engine unreachable: {exc}") from exc


def _raise_api_error(action: str, exc: docker_errors.APIError) -> NoReturn:
    explanation = _explain(exc)
    lowered = explanation.lower()
    if any(fragment in lowered for fragment in CAPACITY_FRAGMENTS):
        raise CapacityError(f"{action}: engine out of resources: {explanation}") from exc
    if exc.is_server_error():
        raise TransientProvisionerError(f"{action}: engine error: {explanation}") from exc
    # 4xx: the request itself is wrong (unknown network, bad limits, ...).
    raise PermanentProvisionerError(f"{action}: engine refused: {explanation}") from exc


def _explain(exc: docker_errors.APIError) -> str:
    return str(exc.explanation or exc)


def _engine_address(docker_host: str | None) -> str:
    """Where the service host reaches containers: the engine's host, else loopback."""
    if docker_host:
        parts = urlsplit(docker_host)
        if parts.scheme in ("tcp", "http", "https", "ssh") and parts.hostname:
            return parts.hostname
    return "127.0.0.1"


def _via_host_gateway(url: str) -> str:
    """Point a loopback service URL at the engine's host gateway (bridge networks)."""
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return url
    netloc = HOST_GATEWAY_NAME + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _free_loopback_port() -> int:
    # Racy by nature (freed before the engine binds it); a clash surfaces as
    # "port is already allocated", a CapacityError, and the retry picks another.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
