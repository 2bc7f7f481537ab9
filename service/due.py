"""When time alone next gives the ``maintain`` pass work to do.

Between events (a request, a release, an agent's callback) what the pass finds changes
only with the clock: a lease's idle, lifetime or pending deadline, a provisioning
timeout, a create backoff ending, a schedule window's edge, and what trim keeps as the
demand estimate decays. ``next_due`` reads those from the database and the pools' own
policies, so a replay (``workerlease simulate``) can run the pass when it has work
instead of every few virtual seconds. The running service keeps its fixed interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from service.capacity import WarmPolicy, keep_falls_below, next_schedule_edge
from service.db import core_connection
from service.driver_sql import DriverStatement
from service.models import Lease, LeaseState, Pool, Worker, WorkerState
from service.pools import (
    PoolCounts,
    PoolView,
    counts_by_pool,
    pool_history,
    pools_by_name,
    refill_wanted,
    warm_policy,
)
from service.tasks import sweep_due


def next_due(
    session: Session, now: datetime, runs_at: Callable[[datetime], datetime] | None = None
) -> datetime | None:
    """The earliest moment from ``now`` on at which ``maintain`` would act without any
    other event first; None when nothing is ever due. ``now`` itself when a pool lacks
    workers that no ring will ask for (a create failed after the pass planned it, a
    destroy freed room under ``max_workers``). Destroys are not included: the destroy
    pass follows releases and trims, not the clock.

    ``runs_at``: when the caller would run a pass due at a moment (the first tick of its
    interval at or after it, never earlier; ticks more than a second apart). The pass
    for the earliest deadline then bounds the trim check (``capacity.keep_falls_below``'s
    ``planned``): a trim due less than a second before that tick, or later, runs at the
    same tick, so one evaluation of the target replaces the bisection's ~13 (a replay's
    full pass asks after every run)."""
    pools = pools_by_name(session)
    if refill_wanted(session, now):
        return now
    candidates = [*_lease_deadlines(session), *_provision_deadlines(session, pools)]
    candidates += [
        pool.create_backoff_until
        for pool in pools
        if pool.create_backoff_until is not None and pool.create_backoff_until > now
    ]
    deadline = min((moment for moment in candidates if moment is not None), default=None)
    planned = None if deadline is None or runs_at is None else runs_at(deadline)
    counts = counts_by_pool(session)
    for pool in pools:
        if pool.enabled:
            pool_counts = counts.get(pool.name, PoolCounts({}, 0))
            candidates.append(
                _trim_due(session, pool.name, warm_policy(pool), pool_counts, now, planned)
            )
    return min((moment for moment in candidates if moment is not None), default=None)


def expiry_due(
    session: Session,
    now: datetime,
    task_retention_s: int,
    pools: Sequence[PoolView] | None = None,
) -> bool:
    """Whether the ``maintain`` pass's expiry transaction has anything to do at ``now``:
    a lease past a deadline, a pending lease of a disabled pool, a worker past its
    provisioning timeout, a task to end or purge.

    Read without the write lock (``maintain`` asks on a read session): nearly every pass
    has nothing to expire, and its transaction then took SQLite's one write lock for
    nothing while it loaded every provisioning worker and running task (30-60 ms a pass
    in the warm-lease benchmark, up to 240 ms, every lease request waiting behind it).
    Each deadline here is the earliest of what that transaction acts on, so it says yes
    whenever the transaction would act (sometimes when it would not: an idle deadline
    passed by a lease that runs a task). ``pools``: as the caller's transaction read them.
    """
    pools = pools_by_name(session) if pools is None else pools
    deadlines = [*_lease_deadlines(session), *_provision_deadlines(session, pools)]
    if any(moment is not None and moment <= now for moment in deadlines):
        return True
    if _PENDING_OF_DISABLED_POOLS.first(core_connection(session), {}) is not None:
        return True
    return sweep_due(session, now, task_retention_s)


def next_trim_due(
    session: Session,
    pool_name: str,
    policy: WarmPolicy,
    now: datetime,
    planned: datetime | None = None,
) -> datetime | None:
    """``next_due`` after a worker of the enabled pool became ready: only its trim can
    come sooner (one more ready worker), the deadlines are as they were. ``policy``: the
    pool's (``pools.enabled_warm_policy``). ``planned``: when the caller already runs the
    pass (``capacity.keep_falls_below``); a trim due within a second before it or later
    may then be missed."""
    counts = counts_by_pool(session).get(pool_name, PoolCounts({}, 0))
    return _trim_due(session, pool_name, policy, counts, now, planned)


# Asked before and after every full pass: on the driver's cursor (``DriverStatement``),
# as the pools' counts (through the ORM these reads were most of ``expiry_due``).
_ACTIVE_DEADLINES = DriverStatement(
    select(
        func.min(Lease.idle_expires_at).label("idle"), func.min(Lease.expires_at).label("lifetime")
    ).where(Lease.state == LeaseState.ACTIVE.value)
)
_PENDING_DEADLINE = DriverStatement(
    select(func.min(Lease.pending_expires_at).label("pending")).where(
        Lease.state == LeaseState.PENDING.value
    )
)
_PENDING_OF_DISABLED_POOLS = DriverStatement(
    select(Lease.id)
    .join(Pool, col(Pool.name) == col(Lease.pool))
    .where(Lease.state == LeaseState.PENDING.value, col(Pool.enabled).is_(False))
    .limit(1)
)
_OLDEST_PROVISIONING = DriverStatement(
    select(Worker.pool, func.min(Worker.created_at).label("oldest"))
    .where(Worker.state == WorkerState.PROVISIONING.value)
    .group_by(col(Worker.pool))
)


def _lease_deadlines(session: Session) -> list[datetime | None]:
    connection = core_connection(session)
    [active] = _ACTIVE_DEADLINES.all(connection, {})  # aggregates: one row each
    [pending] = _PENDING_DEADLINE.all(connection, {})
    return [*active, *pending]


def _provision_deadlines(session: Session, pools: Sequence[PoolView]) -> list[datetime | None]:
    """Each pool's oldest provisioning worker times out ``provision_timeout`` after its
    creation (``workers.provision_timeouts``)."""
    oldest = dict(_OLDEST_PROVISIONING.all(core_connection(session), {}))
    return [
        oldest[pool.name] + timedelta(seconds=pool.provision_timeout_s)
        for pool in pools
        if oldest.get(pool.name) is not None
    ]


def _trim_due(
    session: Session,
    pool_name: str,
    policy: WarmPolicy,
    counts: PoolCounts,
    now: datetime,
    planned: datetime | None = None,
) -> datetime | None:
    """When trim would first find a surplus: what it keeps (plus the pending leases)
    falls below the workers ready now. A worker that becomes ready later is an event:
    the caller asks again then."""
    edge = next_schedule_edge(policy.schedules, policy.scale_down_delay_s, now)
    surplus_at = counts[WorkerState.READY] - counts.pending_leases
    if surplus_at <= 0 or not policy.reads_history:
        return edge
    horizon = now + timedelta(seconds=policy.history_s + 1)
    since = now - timedelta(seconds=policy.history_s)
    history = pool_history(session, pool_name, since, now)
    until = min(horizon, edge or horizon)
    falls = keep_falls_below(policy, history, now, surplus_at, until, planned)
    return min((m for m in (falls, edge) if m is not None), default=None)
