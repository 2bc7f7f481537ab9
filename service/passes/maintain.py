"""The full pass over all pools, and the quick one that answers waiting leases."""

from __future__ import annotations

from datetime import datetime

from service.db import session_scope
from service.due import expiry_due
from service.leasing import expire, fail_pending_of_disabled_pools, serve_all_pending
from service.passes.create import refill
from service.passes.health import check_health
from service.passes.runtime import Runtime
from service.pools import demand_outruns_supply, pools_by_name, record_warnings, trim
from service.tasks import sweep as sweep_tasks
from service.workers import provision_timeouts


def maintain(rt: Runtime, now: datetime | None = None, wait: bool = True) -> None:
    """Expire, end silent tasks, check health, serve pending leases, trim and refill."""
    now = now or rt.clock.now()
    with session_scope(rt.read_factory) as session:  # the write lock only for work
        pools = pools_by_name(session)
        expiring = expiry_due(session, now, rt.task_retention_s, pools)
    if expiring:
        with session_scope(rt.factory) as session:
            expire(session, now)
            fail_pending_of_disabled_pools(session, now)
            provision_timeouts(session, now, rt.provisioners.deployment.service_url)
            sweep_tasks(session, now, rt.task_retention_s)
    check_health(rt, now)
    # Asked outside any transaction, of the pools read above: a pass changes no pool's
    # provisioner or options (a read transaction of their own was ~5 % of the pass in
    # a cProfile run of a simulated day).
    warnings = {pool.name: rt.provisioners.for_pool(pool).warning for pool in pools}
    with session_scope(rt.factory) as session:
        serve_all_pending(session, now)
        trim(session, now)
        record_warnings(session, warnings, now)
    refill(rt, now, wait)


def answer_demand(
    rt: Runtime, now: datetime | None = None, wait: bool = True, rung: bool = False
) -> None:
    """Refill at once when pending leases outnumber the workers on their way, or, when the
    doorbell rang, when any pool lacks ready workers (a lease took one).

    Runs far more often than ``maintain`` so a lease waiting with ``min_ready: 0`` (or
    a drained pool) does not also wait for the next full pass; the poll reads two
    indexed counts and writes nothing unless there is a gap to fill. A ready deficit
    is checked only when rung: the poll stays as cheap as before, and a lost ring
    leaves the refill to the next ``maintain`` pass.

    A rung pass goes straight to ``refill``, whose plan is the same check
    (``pools.refill_wanted``) made under the write lock: a warm take nearly always
    leaves a gap, and checking first in a read transaction of its own read the counts,
    the pools and the history twice (simulate's profile: 0.44 ms of a rung pass's
    1.4 ms). When nothing is wanted it holds the write lock for that check alone.
    """
    now = now or rt.clock.now()
    if rung:
        refill(rt, now, wait)
        return
    with session_scope(rt.read_factory) as session:
        wanted = demand_outruns_supply(session)
    if wanted:
        refill(rt, now, wait)
