"""Docker provisioner: one container per worker on a Docker engine.

A worker is a container named ``workerlease-<worker id>``, labelled with the
deployment, pool and worker id, whose entry point is the worker agent (see
``images/``). The container is the resource: ``create`` launches it, ``destroy``
removes it with force, and ``list_owned`` finds every container labelled with the
deployment, including exited ones.

Isolation (the defaults; each is a pool option). Tenants' scripts run in these
containers, so a container gets no more than a build needs: a bridge network of its
own deployment (not the host's network), every capability dropped,
``no-new-privileges``, and limits on processes (``pids_limit``), memory (``memory``,
no swap on top) and CPU (``cpus``). The images run the agent as a non-root user;
``user`` overrides the image's user.

Networking. By default every worker joins the bridge network
``workerlease-<deployment id>``, created (labelled with the deployment) on first use
when missing; ``network`` names another one, created the same way when missing
(``subnet`` fixes its address range). On a bridge:

* the service reaches the agent at the container's own address on the bridge (the
  agent binds all interfaces inside the container and advertises that address in its
  ready callback; the handle's ``address`` is the same address). No port is published.
* the agent reaches the service at ``service_url`` when the pool sets it, else at the
  service URL the deployment gives, with a loopback host (127.0.0.1, localhost, ::1)
  replaced by the network's gateway address: the host as the container sees it. The
  service must then listen on that address too: ``serve --host 0.0.0.0`` (or the
  gateway address itself). A server the host binds to 127.0.0.1 only is out of the
  containers' reach, which is the point.

The agent cannot know its bridge address before the container starts, so the
container's entry point is wrapped in a short ``sh`` step that finds the address of
the interface routing to the service URL (with the image's ``python3``, which the
agent needs anyway) and passes it as ``WORKERLEASE_AGENT_ADVERTISE_HOST`` before it
``exec``s the image's own entry point and command. A docker pool's image therefore
needs ``/bin/sh`` and ``python3``.

``network: host`` puts workers on the host's network as before this default changed:
their scripts reach every service bound to the host's loopback. It stays possible,
explicitly, and logs ``docker_host_network_unsafe`` when the provisioner is made; the
agent then binds and advertises 127.0.0.1 and calls the service URL as given.

This module imports the docker SDK at its top; the registry loads it only when a pool
uses ``docker``, so the core never needs the SDK.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NoReturn
from urllib.parse import urlsplit, urlunsplit

import docker
import requests
from docker import errors as docker_errors
from docker.models.containers import Container
from docker.models.images import Image
from docker.models.networks import Network
from docker.types import IPAMConfig, IPAMPool
from pydantic import Field, field_validator

from provisioners.base import (
    LABEL_DEPLOYMENT,
    LABEL_INSTALLATION,
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
NETWORK_PREFIX = "workerlease-"
HOST_NETWORK = "host"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DOCKER_HOST_SCHEMES = ("unix", "tcp", "ssh", "npipe", "http", "https")
# How long a name conflict may take to show the container that won it.
CONFLICT_WAIT_S = 10.0
# One for the process, not per provisioner: the pools of a deployment share its network,
# and the engine's duplicate-name check is best effort (its API docs say so).
_NETWORK_LOCK = threading.Lock()

# The entry point wrapper (see the module docstring): find the address of the interface
# that routes to the service (a UDP connect sends nothing), advertise it, then exec the
# image's own entry point, given as the arguments. An agent that could find this address
# itself ("advertise host: auto") would make this wrapper unnecessary.
ADVERTISE_SCRIPT = """\
addr=$(python3 -c '
import os, socket, urllib.parse
host = urllib.parse.urlsplit(os.environ["WORKERLEASE_URL"]).hostname
family, kind, _, _, target = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
probe = socket.socket(family, kind)
probe.connect(target)
print(probe.getsockname()[0])
') || { echo "workerlease: cannot find the address that routes to $WORKERLEASE_URL" >&2; exit 2; }
export WORKERLEASE_AGENT_ADVERTISE_HOST="$addr"
exec "$@"
"""

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
    """A docker pool's ``options``. The defaults isolate tenants; see the module docstring."""

    image: str = Field(min_length=1, description="Worker image, e.g. workerlease/testing:0.1.0")
    docker_host: str | None = Field(
        None, description="Engine URL (unix://, tcp://, ssh://); default: DOCKER_HOST as usual"
    )
    network: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$",
        description="Bridge network name (created when missing); default "
        "workerlease-<deployment id>; 'host' shares the host's network (unsafe)",
    )
    subnet: ipaddress.IPv4Network | None = Field(
        None, description="Address range of the network when the provisioner creates it"
    )
    service_url: str | None = Field(
        None,
        pattern=r"^https?://[^\s/]+",
        description="URL the agents call back; default: the deployment's, loopback -> gateway",
    )
    cpus: float = Field(1.0, gt=0, description="CPU limit, e.g. 1.5")
    memory: str = Field(
        "1g", pattern=r"^[0-9]+[bkmgBKMG]?$", description="Memory limit (no swap on top)"
    )
    pids_limit: int = Field(512, ge=16, description="Most processes and threads at once")
    user: str | None = Field(
        None,
        pattern=r"^[a-zA-Z0-9_.-]+(:[a-zA-Z0-9_.-]+)?$",
        description="user[:group] to run as; default: the image's (non-root) user",
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

    @field_validator("network")
    @classmethod
    def _reachable_network(cls, value: str | None) -> str | None:
        if value == "none":
            raise ValueError("'none' leaves the agent no way to call back")
        return value


@dataclass(frozen=True)
class BridgeNetwork:
    """A bridge network as the provisioner uses it: its name and the host's address on it."""

    name: str
    gateway: str | None


def container_name(worker_id: str) -> str:
    return f"{CONTAINER_PREFIX}{worker_id}"


def default_network_name(deployment_id: str) -> str:
    return f"{NETWORK_PREFIX}{deployment_id}"


class DockerProvisioner(Provisioner[DockerOptions]):
    name = "docker"
    Options = DockerOptions

    def __init__(self, pool: str, options: DockerOptions) -> None:
        super().__init__(pool, options)
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()
        if options.network == HOST_NETWORK:
            log.warning(
                "docker_host_network_unsafe pool=%s network=host: tenant scripts can reach "
                "every service bound to the host's loopback",
                pool,
            )
        if options.privileged:
            log.warning(
                "docker_privileged_unsafe pool=%s privileged=true: capabilities and "
                "no-new-privileges do not apply",
                pool,
            )

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
                existing.reload()
            log.info(
                "docker_worker_created pool=%s worker=%s container=%s",
                spec.pool,
                spec.worker_id,
                existing.short_id,
            )
            return self._handle(spec.worker_id, spec.pool, existing.id, existing.attrs)

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
                handles.append(
                    self._handle(
                        worker_id, labels.get(LABEL_POOL, ""), container.id, container.attrs
                    )
                )
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
        kwargs = self._container_kwargs(spec, name, self._image())
        container = client.containers.create(self.options.image, **kwargs)
        try:
            container.start()
        except docker_errors.APIError:
            # A container that cannot start would block the name; remove it so a retry
            # (e.g. after capacity frees up) starts clean.
            container.remove(force=True)
            raise
        container.reload()  # the address on the network is known once it runs
        return container

    def _image(self) -> Image:
        """The worker image on the engine, pulled as the ``pull`` option says."""
        client = self._docker()
        if self.options.pull == "always":
            self._pull()
        try:
            return client.images.get(self.options.image)
        except docker_errors.ImageNotFound:
            if self.options.pull != "missing":
                raise
        self._pull()
        return client.images.get(self.options.image)

    def _container_kwargs(self, spec: WorkerSpec, name: str, image: Image) -> dict[str, Any]:
        env = spec.agent_environment()
        env.update(self.options.env)
        env["WORKERLEASE_AGENT_PORT"] = str(self.options.agent_port or spec.agent_port)
        kwargs: dict[str, Any] = {
            "name": name,
            "labels": spec.labels(),
            "detach": True,
            # tini as PID 1: reaps the scripts' orphans and forwards signals to the agent.
            "init": True,
            "privileged": self.options.privileged,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "pids_limit": self.options.pids_limit,
            "mem_limit": self.options.memory,
            "memswap_limit": self.options.memory,  # the same: no swap on top of the limit
            "nano_cpus": int(self.options.cpus * 1e9),
        }
        if self.options.user is not None:
            kwargs["user"] = self.options.user
        if self.options.platform is not None:
            kwargs["platform"] = self.options.platform
        if self.options.network == HOST_NETWORK:
            env["WORKERLEASE_AGENT_HOST"] = "127.0.0.1"
            kwargs["network_mode"] = HOST_NETWORK
        else:
            network = self._network(spec.deployment_id)
            env["WORKERLEASE_AGENT_HOST"] = "0.0.0.0"  # inside the container only
            env["WORKERLEASE_URL"] = self._callback_url(spec.service_url, network)
            kwargs["network"] = network.name
            kwargs["entrypoint"], kwargs["command"] = _advertising_entrypoint(image)
        kwargs["environment"] = env
        return kwargs

    def _network(self, deployment_id: str) -> BridgeNetwork:
        """The pool's bridge network, created (labelled with the deployment) when missing.

        Looked up on every create, not cached, so a network removed by hand is made again.
        """
        name = self.options.network or default_network_name(deployment_id)
        client = self._docker()
        with _NETWORK_LOCK:
            try:
                network = client.networks.get(name)
            except docker_errors.NotFound:
                network = self._create_network(name, deployment_id)
        return BridgeNetwork(name, _gateway(network))

    def _create_network(self, name: str, deployment_id: str) -> Network:
        client = self._docker()
        ipam = None
        if self.options.subnet is not None:
            gateway = str(next(self.options.subnet.hosts()))
            ipam = IPAMConfig(
                pool_configs=[IPAMPool(subnet=str(self.options.subnet), gateway=gateway)]
            )
        try:
            network = client.networks.create(
                name,
                driver="bridge",
                labels={LABEL_DEPLOYMENT: deployment_id},
                ipam=ipam,
                check_duplicate=True,
            )
        except docker_errors.APIError as exc:
            if exc.status_code != 409:
                raise
            return client.networks.get(name)  # another process created it meanwhile
        log.info("docker_network_created pool=%s network=%s", self.pool, name)
        return network

    def _callback_url(self, service_url: str, network: BridgeNetwork) -> str:
        """The service URL an agent on ``network`` can reach (see the module docstring)."""
        if self.options.service_url is not None:
            return self.options.service_url
        parts = urlsplit(service_url)
        if parts.hostname not in LOOPBACK_HOSTS:
            return service_url
        if network.gateway is None:
            raise PermanentProvisionerError(
                f"network {network.name!r} has no IPv4 gateway, so workers cannot reach the "
                f"service at {service_url}; set the pool option service_url"
            )
        netloc = network.gateway + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))

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

    def _handle(
        self, worker_id: str, pool: str, container_id: str | None, attrs: dict[str, Any]
    ) -> WorkerHandle:
        labels = attrs.get("Labels") or (attrs.get("Config") or {}).get("Labels") or {}
        return WorkerHandle(
            worker_id=worker_id,
            pool=pool,
            provider_id=container_id or "",
            address=self._address(attrs),
            installation=labels.get(LABEL_INSTALLATION),
        )

    def _address(self, attrs: dict[str, Any]) -> str | None:
        """Where the service reaches the container: its bridge address, or the engine's host."""
        if self.options.network == HOST_NETWORK:
            return _engine_address(self.options.docker_host)
        return _bridge_address(attrs)

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


def _bridge_address(attrs: dict[str, Any]) -> str | None:
    """The container's address on its network (inspect or listing), None once it stopped."""
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    for settings in networks.values():
        if address := (settings or {}).get("IPAddress"):
            return str(address)
    return None


def _gateway(network: Network) -> str | None:
    """The host's IPv4 address on the network, as the engine's IPAM reports it."""
    for config in (network.attrs.get("IPAM") or {}).get("Config") or []:
        gateway = (config or {}).get("Gateway") or ""
        if gateway and ipaddress.ip_address(gateway).version == 4:
            return str(gateway)
    return None


def _advertising_entrypoint(image: Image) -> tuple[list[str], list[str]]:
    """Entry point and command that run the image's own ones behind ``ADVERTISE_SCRIPT``."""
    config = image.attrs.get("Config") or {}
    original = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    if not original:
        raise PermanentProvisionerError(
            f"image {image.tags or image.id} has no entry point or command to start the agent"
        )
    return ["/bin/sh", "-c", ADVERTISE_SCRIPT, "workerlease-advertise"], original
