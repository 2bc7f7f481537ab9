"""What every pass runs with: sessions, the pools' provisioners, the clock, the dispatchers."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Table
from sqlalchemy import select as core_select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from service.clock import Clock, SystemClock
from service.config import Config, SchedulerConfig
from service.db import core_connection, session_factory, session_scope
from service.doorbell import Bell, NoBell, bell_for
from service.driver_sql import DriverStatement
from service.models import Pool
from service.passes.dispatch import PoolDispatcher
from service.passes.provisioning import Deployment, ProvisionerSet
from service.pools import HIT_TARGET, PoolView, installation_id

DESTROYS_PER_POOL = 8
# Every pass reads them: plain rows of every column on the driver's cursor
# (``DriverStatement``), not ORM objects (the ORM's load was ~14 % of the replay's
# profile). Nothing writes through them: a pass that changes a pool loads its ORM row.
_POOLS: Table = Pool.__table__  # type: ignore[attr-defined]
_POOLS_BY_NAME = DriverStatement(
    core_select(*(HIT_TARGET if c is _POOLS.c.warm_hit_target else c for c in _POOLS.c)).order_by(
        _POOLS.c.name
    )
)


def pools_by_name(session: Session) -> list[PoolView]:
    """Every pool, in the caller's transaction: a pass that claims work reads them there
    rather than in a transaction of their own."""
    pools: list[PoolView] = _POOLS_BY_NAME.all(core_connection(session), {})
    return pools


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
