"""The provisioner interface: how workerlease asks a platform for worker machines.

A provisioner turns a worker row (already committed by the service in state
``provisioning``) into a real machine running the worker agent, and removes it
again. The service owns all state; a provisioner never touches the database.

Contract every implementation keeps (the service relies on each point):

* ``create(spec)`` is idempotent per ``spec.worker_id``: calling it again for a
  worker id that already has a resource returns a handle to that resource and
  starts nothing new. This is what makes a crash between "create" and "record
  the result" safe: the service simply calls ``create`` again.
* ``create`` returns as soon as the resource is launched. The worker becomes
  ``ready`` only when its agent calls back to the service, never because
  ``create`` returned.
* ``destroy(handle)`` is idempotent and succeeds when the resource is already
  gone. It returns only once the platform has accepted the removal.
* ``describe(handles)`` returns a :class:`ResourceState` for every handle given
  (``GONE`` for resources that no longer exist).
* ``list_owned(deployment_id)`` returns a handle for every resource this
  provisioner holds for the deployment, in any pool, found by the ownership
  labels/tags (``workerlease.deployment``, ``workerlease.pool``,
  ``workerlease.worker``), so resources left behind by a crash are found; each
  handle carries the resource's ``workerlease.installation`` label (None if absent).
* Every resource is labelled with the deployment id, pool name and worker id, and
  with the installation id when the spec has one (``WorkerSpec.labels()``).
* Errors are raised as :class:`TransientProvisionerError` (worth retrying:
  throttling, timeouts, daemon restarting, capacity) or
  :class:`PermanentProvisionerError` (configuration is wrong: image missing,
  bad credentials); never as SDK exceptions. Chain the cause with ``from``.
* Results are frozen dataclasses, never SDK objects.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

LABEL_DEPLOYMENT = "workerlease.deployment"
# The database that made the resource: two services that share a deployment id by
# mistake (each with its own database) never take each other's resources for orphans.
LABEL_INSTALLATION = "workerlease.installation"
LABEL_POOL = "workerlease.pool"
LABEL_WORKER = "workerlease.worker"
#: The capability of pools whose workers run tasks in containers (docs/tasks.md).
EXECUTION_CONTAINERS = "execution-containers"


class ProvisionerError(Exception):
    """Base of every error a provisioner raises."""


class TransientProvisionerError(ProvisionerError):
    """The call may succeed if retried later (throttled, unreachable, no capacity)."""


class PermanentProvisionerError(ProvisionerError):
    """Retrying the same call will not help until an operator changes something."""


class CapacityError(TransientProvisionerError):
    """The platform has no capacity for this request right now."""


class ResourceState(enum.StrEnum):
    PENDING = "pending"  # launched, not yet running
    RUNNING = "running"  # running; the agent may or may not have reported ready
    GONE = "gone"  # terminated, exited or never existed


class ProvisionerOptions(BaseModel):
    """Base for every provisioner's ``Options`` model: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a provisioner needs to start one worker."""

    worker_id: str
    pool: str
    os: str
    deployment_id: str
    service_url: str
    bootstrap_token: str
    agent_port: int = 0
    extra_env: Mapping[str, str] = field(default_factory=dict)
    installation_id: str = ""
    #: The pool's ``capabilities`` (e.g. ``execution-containers``: the worker's agent
    #: must be able to run ``docker``); a provisioner gives the worker what they need.
    capabilities: tuple[str, ...] = ()

    def agent_environment(self) -> dict[str, str]:
        """The environment the worker agent is configured by (see images/agent)."""
        env = {
            "WORKERLEASE_URL": self.service_url,
            "WORKERLEASE_WORKER_ID": self.worker_id,
            "WORKERLEASE_DEPLOYMENT": self.deployment_id,
            "WORKERLEASE_INSTALLATION": self.installation_id,
            "WORKERLEASE_POOL": self.pool,
            "WORKERLEASE_BOOTSTRAP_TOKEN": self.bootstrap_token,
            "WORKERLEASE_AGENT_PORT": str(self.agent_port),
        }
        env.update(self.extra_env)
        return env

    def labels(self) -> dict[str, str]:
        labels = {
            LABEL_DEPLOYMENT: self.deployment_id,
            LABEL_POOL: self.pool,
            LABEL_WORKER: self.worker_id,
        }
        if self.installation_id:
            labels[LABEL_INSTALLATION] = self.installation_id
        return labels


@dataclass(frozen=True)
class WorkerHandle:
    """How a provisioner finds one resource again. Stored by the service."""

    worker_id: str
    pool: str
    provider_id: str  # pid, container id, instance id ...
    address: str | None = None  # where the service host reaches the machine, if known
    installation: str | None = None  # the installation label, as ``list_owned`` found it


OptionsT = TypeVar("OptionsT", bound=ProvisionerOptions)


class Provisioner(ABC, Generic[OptionsT]):
    """One configured provisioner serves one pool (its options are the pool's).

    A subclass names its options model twice, as the type parameter (for the type
    checker: ``self.options`` is that model) and as ``Options`` (for the registry,
    which validates a pool's ``options`` with it before constructing the provisioner)::

        class DockerProvisioner(Provisioner[DockerOptions]):
            Options = DockerOptions

    The constructor refuses options of any other model with ``TypeError``.
    """

    #: Registry name, e.g. ``"local"``.
    name: ClassVar[str]
    #: Pydantic model that validates a pool's ``options``; the class's ``OptionsT``.
    Options: ClassVar[type[ProvisionerOptions]] = ProvisionerOptions
    #: How many workers one ``destroy_many`` call should get. 1 unless the platform has a
    #: batch call: the service runs several batches of a pool at once, so one slow
    #: destroy never holds up the others.
    destroy_batch_size: ClassVar[int] = 1

    def __init__(self, pool: str, options: OptionsT) -> None:
        if not isinstance(options, self.Options):
            raise TypeError(
                f"{type(self).__name__} needs {self.Options.__name__}, got {type(options).__name__}"
            )
        self.pool = pool
        self.options: OptionsT = options
        # The pool's capabilities (set by the service after construction), so that a
        # provisioner can warn about one at start, before its first worker.
        self.capabilities: frozenset[str] = frozenset()

    @abstractmethod
    def create(self, spec: WorkerSpec) -> WorkerHandle:
        """Launch the worker's resource, or find the one already launched for its id."""

    @abstractmethod
    def destroy(self, handle: WorkerHandle) -> None:
        """Remove the resource; succeed when it is already gone."""

    @abstractmethod
    def describe(self, handles: Iterable[WorkerHandle]) -> dict[str, ResourceState]:
        """Map each handle's worker id to the resource's current state."""

    @abstractmethod
    def list_owned(self, deployment_id: str) -> list[WorkerHandle]:
        """Every resource of this provisioner labelled with the deployment id."""

    def destroy_many(self, handles: Iterable[WorkerHandle]) -> dict[str, Exception | None]:
        """Destroy several resources; map each worker id to ``None`` or the error it met.

        Override when the platform has a batch call (EC2 TerminateInstances).
        """
        results: dict[str, Exception | None] = {}
        for handle in handles:
            try:
                self.destroy(handle)
                results[handle.worker_id] = None
            except ProvisionerError as exc:
                results[handle.worker_id] = exc
        return results

    @property
    def ready_when_running(self) -> bool:
        """True when ``RUNNING`` alone makes a worker ready (images without the agent).

        By default a worker is ready only after its agent's callback.
        """
        return False

    @property
    def warning(self) -> str | None:
        """What an operator must know about how this pool's workers run (for example,
        that they are not isolated from the service); None when nothing is amiss.
        The service shows it in ``/v1/admin/pools`` and logs it."""
        return None

    def close(self) -> None:
        """Release clients and connections; called when the service stops."""
