"""A provisioner for ``workerlease simulate`` only: machines that exist on a virtual clock.

It keeps the contract of ``provisioners.base`` (idempotent per worker id, ``destroy``
of something gone succeeds, frozen results) so the service's real refill, trim and
destroy code runs against it unchanged. ``create`` returns at once; the machine's
agent "calls back" after a provisioning time drawn from a lognormal distribution
(given by its median and 95th percentile), which the simulation replays as the
agent's ready callback at that virtual time. A create fails with the pool's
``failure_rate`` (a transient error, as a cloud's capacity error would be).

It is never in the registry: the simulation's runtime builds it for every pool.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydantic import Field

from provisioners.base import (
    Provisioner,
    ProvisionerOptions,
    ResourceState,
    TransientProvisionerError,
    WorkerHandle,
    WorkerSpec,
)

Z95 = 1.6448536269514722  # the standard normal's 95th percentile


class SimulatedOptions(ProvisionerOptions):
    provision_median_s: float = Field(gt=0)
    provision_p95_s: float = Field(gt=0)
    failure_rate: float = Field(default=0.0, ge=0, lt=1)


@dataclass
class SimulatedCloud:
    """The simulation's world: its clock, its dice, and the machines it holds."""

    now: Callable[[], datetime]
    on_ready: Callable[[WorkerSpec, datetime], None]  # the agent calls back at that time
    rng: random.Random
    machines: dict[str, WorkerSpec] = field(default_factory=dict)
    destroyed: set[str] = field(default_factory=set)
    failures: int = 0  # creates that failed, so a replay knows a pool now backs off


class SimulatedProvisioner(Provisioner[SimulatedOptions]):
    name = "simulated"
    Options = SimulatedOptions
    # A batch call, as EC2's TerminateInstances: the destroy pass records each batch in a
    # transaction of its own, and one destroy at a time was a seventh of a replay's
    # transactions. Worker-minutes end at the decision to destroy, so this moves a figure
    # only where a pass finds more than 200 to destroy (the inline dispatcher's slots,
    # the claim's limit before) and ``max_workers`` binds.
    destroy_batch_size = 100

    def __init__(self, pool: str, options: SimulatedOptions, cloud: SimulatedCloud) -> None:
        super().__init__(pool, options)
        self.cloud = cloud

    def provision_time(self) -> float:
        """A lognormal draw with the configured median and 95th percentile."""
        median, p95 = self.options.provision_median_s, self.options.provision_p95_s
        sigma = math.log(p95 / median) / Z95 if p95 > median else 0.0
        return median * math.exp(sigma * self.cloud.rng.gauss(0.0, 1.0))

    def create(self, spec: WorkerSpec) -> WorkerHandle:
        handle = WorkerHandle(spec.worker_id, spec.pool, f"sim-{spec.worker_id}")
        if spec.worker_id in self.cloud.machines:
            return handle  # idempotent: the machine is already on its way
        if self.cloud.rng.random() < self.options.failure_rate:
            self.cloud.failures += 1
            raise TransientProvisionerError("simulated create failure")
        self.cloud.machines[spec.worker_id] = spec
        at = self.cloud.now() + timedelta(seconds=self.provision_time())
        self.cloud.on_ready(spec, at)
        return handle

    def destroy(self, handle: WorkerHandle) -> None:
        self.cloud.machines.pop(handle.worker_id, None)
        self.cloud.destroyed.add(handle.worker_id)

    def describe(self, handles: Iterable[WorkerHandle]) -> dict[str, ResourceState]:
        return {
            h.worker_id: (
                ResourceState.RUNNING if h.worker_id in self.cloud.machines else ResourceState.GONE
            )
            for h in handles
        }

    def list_owned(self, deployment_id: str) -> list[WorkerHandle]:
        return [
            WorkerHandle(worker_id, spec.pool, f"sim-{worker_id}")
            for worker_id, spec in self.cloud.machines.items()
            if spec.deployment_id == deployment_id
        ]
