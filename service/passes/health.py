"""Health: ask the provisioners about running workers; the dead fail, RUNNING may mean ready."""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import select as sa_select
from sqlmodel import col

from provisioners import ResourceState
from service import metrics
from service.db import core_connection, session_scope
from service.driver_sql import DriverStatement
from service.models import Worker, WorkerState
from service.passes.provisioning import failure_of, group_by_pool, handle_of
from service.passes.runtime import Runtime
from service.pools import pools_by_name
from service.workers import apply_health, health_change

log = logging.getLogger("workerlease.passes.health")

_OBSERVED_STATES = (WorkerState.PROVISIONING, WorkerState.READY, WorkerState.LEASED)


# Plain columns, not Worker objects: this reads every running worker on every pass, and
# building ORM objects (tokens decrypted) was most of its cost. On the driver's cursor
# (``DriverStatement``), as the other reads every pass makes.
_RUNNING = DriverStatement(
    sa_select(
        col(Worker.id),
        col(Worker.pool),
        col(Worker.state),
        col(Worker.provider_id),
        col(Worker.address),
    ).where(
        col(Worker.state).in_([state.value for state in _OBSERVED_STATES]),
        col(Worker.provider_id).is_not(None),
    )
)


def check_health(rt: Runtime, now: datetime) -> int:
    """Describe every running worker, pool by pool; apply what changed. Returns the moves."""
    with session_scope(rt.read_factory) as session:
        pools = {p.name: p for p in pools_by_name(session)}
        workers = _RUNNING.all(core_connection(session), {})
    changed = 0
    for pool_name, pool_workers in group_by_pool(workers).items():
        provisioner = rt.provisioners.for_pool(pools[pool_name])
        try:
            states = provisioner.describe([handle_of(w) for w in pool_workers])
        except Exception as exc:
            failure = failure_of(exc)
            metrics.PROVISIONER_ERRORS.labels(pool_name, "describe", failure.kind).inc()
            log.warning("describe_failed pool=%s error=%s", pool_name, failure.detail)
            continue
        gone = {wid for wid, state in states.items() if state == ResourceState.GONE}
        running = {wid for wid, state in states.items() if state == ResourceState.RUNNING}
        ready_when_running = provisioner.ready_when_running
        moving = [
            w.id
            for w in pool_workers
            if health_change(w.state, w.id in gone, w.id in running, ready_when_running)
        ]
        if moving:
            with session_scope(rt.factory) as session:
                changed += apply_health(session, moving, gone, running, ready_when_running, now)
    return changed
