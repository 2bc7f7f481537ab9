"""The runtime ``workerlease simulate`` runs the real passes with: every pool's provisioner
is a ``SimulatedProvisioner`` on the simulation's virtual clock, and provisioner calls
run inline (a simulation has one thread and never sleeps)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Engine

from provisioners.base import Provisioner, WorkerSpec
from provisioners.simulated import SimulatedCloud, SimulatedOptions, SimulatedProvisioner
from service.clock import Clock
from service.config import Config, PoolConfig
from service.db import held_session_factories, session_factory
from service.passes.dispatch import PoolDispatcher
from service.passes.provisioning import Deployment, ProvisionerSet
from service.passes.runtime import Runtime
from service.pools import PoolView

log = logging.getLogger("workerlease.simulate")

# Provisioning times when a pool's config has no ``simulation.provision_seconds``.
DEFAULT_PROVISION_S = {"ubuntu": (40.0, 90.0), "linux": (40.0, 90.0), "windows": (480.0, 900.0)}


def simulated_options(pool: PoolConfig) -> SimulatedOptions:
    given = pool.simulation.provision_seconds
    median, p95 = (given.median, given.p95) if given else DEFAULT_PROVISION_S[pool.os]
    return SimulatedOptions(
        provision_median_s=median, provision_p95_s=p95, failure_rate=pool.simulation.failure_rate
    )


def simulated_cloud(
    now: Callable[[], datetime],
    on_ready: Callable[[str, str, str, datetime], None],
    seed: int,
) -> SimulatedCloud:
    """The simulated platform; ``on_ready(worker_id, pool, bootstrap_token, at)`` is told
    when each machine's agent will call back."""

    def ready(spec: WorkerSpec, at: datetime) -> None:
        on_ready(spec.worker_id, spec.pool, spec.bootstrap_token, at)

    return SimulatedCloud(now, ready, random.Random(seed))


class SimulatedProvisioners(ProvisionerSet):
    """The pools' provisioners, all simulated (the registry is never asked)."""

    def __init__(self, deployment: Deployment, cloud: SimulatedCloud, config: Config) -> None:
        super().__init__(deployment)
        self._built = {
            pool.name: SimulatedProvisioner(pool.name, simulated_options(pool), cloud)
            for pool in config.pools
        }

    def for_pool(self, pool: PoolView) -> Provisioner[Any]:
        return self._built[pool.name]


class InlineDispatcher(PoolDispatcher):
    """Each call runs at once in the caller's thread; nothing is ever in flight after."""

    def __init__(self, name: str) -> None:
        super().__init__(name, per_pool=1, max_threads=1)  # the executor never starts a thread

    def free_slots(self, pool: str) -> int:
        return self.max_queued

    def in_flight(self, pool: str) -> set[str]:
        return set()

    def submit(self, pool: str, key: str, call: Callable[..., Any], *args: Any) -> None:
        try:
            call(*args)
        except Exception:  # as PoolDispatcher: the call records its own failures
            log.exception("%s_call_failed pool=%s key=%s", self.name, pool, key)

    def wait(self, timeout: float | None = None) -> bool:
        return True


def simulation_runtime(
    config: Config, engine: Engine, clock: Clock, cloud: SimulatedCloud
) -> Runtime:
    deployment = Deployment(deployment_id="simulation", service_url="http://simulation.invalid")
    rt = Runtime(
        factory=session_factory(engine),
        provisioners=SimulatedProvisioners(deployment, cloud, config),
        clock=clock,
        settings=config.scheduler,
    )
    rt.creates.shutdown(0)
    rt.destroys.shutdown(0)
    rt.creates, rt.destroys = InlineDispatcher("create"), InlineDispatcher("destroy")
    # One thread and an in-memory database: its connections held open (``close_held``).
    rt.factory, rt.read_factory = held_session_factories(engine)
    return rt
