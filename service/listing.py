"""The read side: the queries behind list endpoints, ``/metrics`` and readiness.

Read-only; each function takes the request's session. Lists of live rows render
their state list as literals (``by_state``) so the partial "live" indexes of
``service.models`` match them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import bindparam, func
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import BindParameter
from sqlmodel import Session, col, select

from service.capacity import Target
from service.models import (
    LIVE_LEASE_STATES,
    LIVE_WORKER_STATES,
    Event,
    Lease,
    LeaseState,
    Pool,
    Task,
    Tenant,
    Worker,
    WorkerState,
)
from service.pools import PoolCounts, counts_by_pool, warm_targets

S = TypeVar("S", bound=Select[Any])


def by_state(statement: S, column: Any, state: str, live: tuple[str, ...]) -> S:
    """Apply a ``?state=`` filter: a state, ``live`` (the given live states) or ``all``."""
    if state == "live":
        # Literal values, so the partial "live" indexes (service.models) match them.
        states: BindParameter[list[str]] = bindparam(
            "live_states", [str(s) for s in live], expanding=True, literal_execute=True
        )
        return statement.where(col(column).in_(states))
    if state != "all":
        return statement.where(column == state)
    return statement


def enabled_pools(session: Session) -> Sequence[Pool]:
    return session.exec(
        select(Pool).where(col(Pool.enabled).is_(True)).order_by(col(Pool.name))
    ).all()


def pools_with_counts(session: Session) -> list[tuple[Pool, PoolCounts]]:
    """Every pool with its live workers per state and its pending leases."""
    counts = counts_by_pool(session)
    pools = session.exec(select(Pool).order_by(col(Pool.name))).all()
    return [(pool, counts.get(pool.name, PoolCounts({}, 0))) for pool in pools]


def pools_with_targets(session: Session, now: datetime) -> list[tuple[Pool, PoolCounts, Target]]:
    """Every pool with its counts and its warm target (and why)."""
    rows = pools_with_counts(session)
    targets = warm_targets(session, [pool for pool, _ in rows], now)
    return [(pool, counts, targets[pool.name]) for pool, counts in rows]


def pool_counts(session: Session, pool: str) -> PoolCounts:
    return counts_by_pool(session).get(pool, PoolCounts({}, 0))


def workers_page(
    session: Session, pool: str | None, state: str, limit: int, offset: int
) -> list[tuple[Worker, str | None]]:
    """Workers newest first, each with the id of its lease (a worker has at most one)."""
    statement = select(Worker)
    if pool:
        statement = statement.where(Worker.pool == pool)
    statement = by_state(statement, Worker.state, state, LIVE_WORKER_STATES)
    rows = session.exec(
        statement.order_by(col(Worker.created_at).desc(), col(Worker.id))
        .offset(offset)
        .limit(limit)
    ).all()
    lease_of = _leases_of(session, [w.id for w in rows])
    return [(w, lease_of.get(w.id)) for w in rows]


def _leases_of(session: Session, worker_ids: list[str]) -> dict[str, str]:
    if not worker_ids:
        return {}
    statement = select(Lease.worker_id, Lease.id).where(col(Lease.worker_id).in_(worker_ids))
    return {
        worker_id: lease_id for worker_id, lease_id in session.exec(statement).all() if worker_id
    }


def leases_page(
    session: Session,
    *,
    tenant_id: str | None,
    pool: str | None,
    state: str,
    limit: int,
    offset: int = 0,
) -> Sequence[Lease]:
    """Leases newest first, filtered by tenant, pool and ``?state=``."""
    statement = select(Lease)
    if tenant_id:
        statement = statement.where(Lease.tenant_id == tenant_id)
    if pool:
        statement = statement.where(Lease.pool == pool)
    statement = by_state(statement, Lease.state, state, LIVE_LEASE_STATES)
    return session.exec(
        statement.order_by(col(Lease.created_at).desc(), col(Lease.id)).offset(offset).limit(limit)
    ).all()


def events_page(session: Session, before: int | None, limit: int) -> Sequence[Event]:
    """The audit log, newest first, older than the ``before`` cursor."""
    statement = select(Event).order_by(col(Event.id).desc()).limit(limit)
    if before is not None:
        statement = statement.where(col(Event.id) < before)
    return session.exec(statement).all()


@dataclass(frozen=True)
class FleetCounts:
    """What ``/metrics`` reports from the database, read in one transaction."""

    workers: list[tuple[str, str, int]]  # pool, state, count (live states)
    leases: list[tuple[str, str, int]]  # pool, state, count (live states)
    pools: Sequence[Pool]


def fleet_counts(session: Session) -> FleetCounts:
    workers = [
        (pool, str(state), n)
        for pool, counts in counts_by_pool(session).items()
        for state, n in counts.by_state.items()
    ]
    leases = session.exec(
        select(Lease.pool, Lease.state, func.count())
        .where(col(Lease.state).in_(LIVE_LEASE_STATES))
        .group_by(col(Lease.pool), col(Lease.state))
    ).all()
    return FleetCounts(
        workers=workers,
        leases=[(p, str(s), n) for p, s, n in leases],
        pools=session.exec(select(Pool)).all(),
    )


@dataclass(frozen=True)
class Waiting:
    """Why a pending lease waits: ``kind`` is the first that applies of

    - ``worker_on_its_way``: a provisioning (or just ready) worker is there for each lease
      ahead of it and for this one, or the pool has room to start one for it now;
    - ``provisioner_degraded``: creates are failing (``degraded_reason``);
    - ``pool_at_max_workers``: first in the queue, but no room for another worker until
      one goes;
    - ``queued_behind``: ``leases_ahead`` leases take the workers the pool can have first.
    """

    kind: str
    leases_ahead: int
    workers_on_the_way: int
    max_workers: int
    time_to_worker_s: float | None  # mean provisioning time of the pool's live workers
    degraded_reason: str | None


@dataclass(frozen=True)
class _PoolWaitFacts:
    pool: Pool | None
    counts: PoolCounts
    time_to_worker_s: float | None


def waiting_reasons(session: Session, leases: Sequence[Lease]) -> dict[str, Waiting]:
    """Why each pending lease of ``leases`` waits, by lease id (others are left out).

    Cheap: per pool its row, its live worker counts and the provisioning time of its
    live workers ((pool, state, ready_at) index); per lease one indexed count of the
    pending leases ahead of it. Nothing for a lease that does not wait.
    """
    pending = [lease for lease in leases if lease.state == LeaseState.PENDING]
    facts = {name: _pool_wait_facts(session, name) for name in {lease.pool for lease in pending}}
    return {
        lease.id: _why_waiting(facts[lease.pool], _leases_ahead(session, lease))
        for lease in pending
    }


def _pool_wait_facts(session: Session, name: str) -> _PoolWaitFacts:
    counts = PoolCounts({}, 0)
    for state, n in session.exec(
        select(Worker.state, func.count())
        .where(Worker.pool == name, col(Worker.state).in_(LIVE_WORKER_STATES))
        .group_by(col(Worker.state))
    ).all():
        counts.by_state[state] = n
    # Live workers only: the (pool, state, ready_at) index bounds this by the live fleet.
    recent = session.exec(
        select(Worker.pool, Worker.created_at, Worker.ready_at)
        .where(
            Worker.pool == name,
            col(Worker.state).in_((WorkerState.READY, WorkerState.LEASED)),
            col(Worker.ready_at).is_not(None),
        )
        .order_by(col(Worker.ready_at).desc())
        .limit(50)
    ).all()
    return _PoolWaitFacts(session.get(Pool, name), counts, _mean_seconds(recent).get(name))


def _leases_ahead(session: Session, lease: Lease) -> int:
    """Pending leases of its pool served before it (the queue's order: created_at, id)."""
    earlier = (col(Lease.created_at) < lease.created_at) | (
        (col(Lease.created_at) == lease.created_at) & (col(Lease.id) < lease.id)
    )
    return session.exec(
        select(func.count()).where(
            Lease.state == LeaseState.PENDING, Lease.pool == lease.pool, earlier
        )
    ).one()


def _why_waiting(facts: _PoolWaitFacts, ahead: int) -> Waiting:
    counts, pool = facts.counts, facts.pool
    on_the_way = counts[WorkerState.PROVISIONING] + counts[WorkerState.READY]
    max_workers = pool.max_workers if pool else 0
    degraded = (pool.degraded_reason or pool.destroy_error) if pool else None
    room = max(0, max_workers - counts.not_destroyed)
    if ahead < on_the_way:
        kind = "worker_on_its_way"
    elif degraded:
        kind = "provisioner_degraded"
    elif ahead < on_the_way + room:
        kind = "worker_on_its_way"  # the demand pass starts one for it now
    elif ahead == 0:
        kind = "pool_at_max_workers"
    else:
        kind = "queued_behind"
    return Waiting(kind, ahead, on_the_way, max_workers, facts.time_to_worker_s, degraded)


# ---- the admin dashboard -------------------------------------------------------


@dataclass(frozen=True)
class PoolOverview:
    """One pool as the dashboard's overview shows it."""

    pool: Pool
    counts: PoolCounts
    oldest_pending_at: datetime | None  # when the longest-waiting pending lease was asked
    lease_wait_s: float | None  # mean request-to-worker of leases activated recently
    provisioning_s: float | None  # mean row-to-ready of workers ready recently
    warm: Target | None = None  # the ready target and why (service.capacity)


def pools_overview(
    session: Session, since: datetime, now: datetime | None = None
) -> list[PoolOverview]:
    """Every pool with its counts, oldest pending lease and recent times to a worker (and
    its warm target at ``now``, when given)."""
    oldest = dict(
        session.exec(
            select(Lease.pool, func.min(Lease.created_at))
            .where(Lease.state == LeaseState.PENDING)
            .group_by(col(Lease.pool))
        ).all()
    )
    waits = _mean_seconds(
        session.exec(
            select(Lease.pool, Lease.created_at, Lease.activated_at)
            .where(col(Lease.activated_at) >= since)
            .order_by(col(Lease.activated_at).desc())
            .limit(2000)
        ).all()
    )
    provisioning = _mean_seconds(
        session.exec(
            select(Worker.pool, Worker.created_at, Worker.ready_at)
            .where(col(Worker.ready_at) >= since)
            .order_by(col(Worker.ready_at).desc())
            .limit(2000)
        ).all()
    )
    rows = pools_with_counts(session)
    targets = {} if now is None else warm_targets(session, [pool for pool, _ in rows], now)
    return [
        PoolOverview(
            pool,
            counts,
            _utc(oldest.get(pool.name)),
            waits.get(pool.name),
            provisioning.get(pool.name),
            targets.get(pool.name),
        )
        for pool, counts in rows
    ]


def _utc(value: datetime | None) -> datetime | None:
    # Aggregates bypass the column type: SQLite hands back a naive (UTC) value or a string.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value is not None and value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


def _mean_seconds(rows: Sequence[tuple[str, datetime, datetime | None]]) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for pool, start, end in rows:
        if end is not None:
            totals.setdefault(pool, []).append((end - start).total_seconds())
    return {pool: sum(values) / len(values) for pool, values in totals.items()}


def pool_workers(
    session: Session, pool: str, limit: int = 500
) -> list[tuple[Worker, Lease | None]]:
    """The pool's live workers, newest first, each with its lease (and so its tenant)."""
    workers = session.exec(
        by_state(
            select(Worker).where(Worker.pool == pool), Worker.state, "live", LIVE_WORKER_STATES
        )
        .order_by(col(Worker.created_at).desc())
        .limit(limit)
    ).all()
    ids = [w.id for w in workers]
    leases = (
        {
            lease.worker_id: lease
            for lease in session.exec(select(Lease).where(col(Lease.worker_id).in_(ids))).all()
        }
        if ids
        else {}
    )
    return [(w, leases.get(w.id)) for w in workers]


def lease_tasks(session: Session, lease_id: str) -> Sequence[Task]:
    """A lease's tasks in the order they were submitted (the dashboard's lease page)."""
    return session.exec(select(Task).where(Task.lease_id == lease_id).order_by(col(Task.seq))).all()


def lease_timeline(session: Session, lease: Lease, limit: int = 500) -> Sequence[Event]:
    """A lease's audit events, oldest first: its own, its worker's, and events of other
    kinds (tasks, ...) of its tenant on its pool while it lived."""
    subjects = [lease.id] + ([lease.worker_id] if lease.worker_id else [])
    own = col(Event.subject_id).in_(subjects)
    related = (
        (col(Event.kind).not_in(("lease", "worker", "tenant", "pool")))
        & (Event.tenant_id == lease.tenant_id)
        & (col(Event.at) >= lease.created_at)
    )
    if lease.ended_at is not None:
        related = related & (col(Event.at) <= lease.ended_at)
    return session.exec(
        select(Event).where(own | related).order_by(col(Event.id)).limit(limit)
    ).all()


def events_filtered(
    session: Session,
    *,
    kind: str | None,
    subject: str | None,
    pool: str | None,
    tenant_id: str | None,
    before: int | None,
    limit: int,
) -> Sequence[Event]:
    """The audit log, newest first, filtered; ``before`` is the id cursor of the next page."""
    statement = select(Event)
    if kind:
        statement = statement.where(Event.kind == kind)
    if subject:
        statement = statement.where(Event.subject_id == subject)
    if pool:
        statement = statement.where(Event.pool == pool)
    if tenant_id:
        statement = statement.where(Event.tenant_id == tenant_id)
    if before is not None:
        statement = statement.where(col(Event.id) < before)
    return session.exec(statement.order_by(col(Event.id).desc()).limit(limit)).all()


def tenants_all(session: Session, limit: int = 1000) -> Sequence[Tenant]:
    return session.exec(
        select(Tenant).order_by(col(Tenant.created_at).desc(), col(Tenant.id)).limit(limit)
    ).all()


def live_leases_by_tenant(session: Session) -> dict[str, int]:
    rows = session.exec(
        select(Lease.tenant_id, func.count())
        .where(col(Lease.state).in_(LIVE_LEASE_STATES))
        .group_by(col(Lease.tenant_id))
    ).all()
    return dict(rows)
