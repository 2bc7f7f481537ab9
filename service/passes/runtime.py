"""What every pass runs with: sessions, the pools' provisioners, the clock, the dispatchers."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from service.clock import Clock, SystemClock
from service.config import Config, SchedulerConfig
from service.db import session_factory, session_scope
from service.doorbell import Bell, NoBell, bell_for
from service.passes.dispatch import PoolDispatcher
from service.passes.provisioning import Deployment, ProvisionerSet
from service.pools import PoolView, installation_id, pools_by_name

DESTROYS_PER_POOL = 8


@dataclass
class Runtime:
    factory: sessionmaker[Session]
    provisioners: ProvisionerSet
    clock: Clock
    settings: SchedulerConfig
    bell: Bell = field(default_factory=NoBell)
    task_retention_s: int = 7 * 86400
    creates: PoolDispatcher = field(init=False)
    destroys: PoolDispatcher = field(init=False)
    read_factory: sessionmaker[Session] = field(init=False)

    def __post_init__(self) -> None:
        bind = self.factory.kw["bind"]
        self.read_factory = session_factory(bind, read_only=True)
        self.creates = PoolDispatcher("create", self.settings.max_concurrent_creates)
        self.destroys = PoolDispatcher(
            "destroy", per_pool=DESTROYS_PER_POOL, max_queued=DESTROYS_PER_POOL
        )

    def pools(self) -> list[PoolView]:
        with session_scope(self.read_factory) as session:
            return pools_by_name(session)

    def close(self) -> None:
        self.creates.shutdown()
        self.destroys.shutdown()
        self.provisioners.close()


def build_runtime(config: Config, engine: Engine, url: str, clock: Clock | None = None) -> Runtime:
    with session_scope(session_factory(engine, read_only=True)) as session:
        installation = installation_id(session)
    deployment = Deployment(
        deployment_id=config.deployment_id, service_url=url, installation_id=installation
    )
    return Runtime(
        factory=session_factory(engine),
        provisioners=ProvisionerSet(deployment),
        clock=clock or SystemClock(),
        settings=config.scheduler,
        bell=bell_for(engine, config.scheduler.doorbell),
        task_retention_s=config.task_retention,
    )
