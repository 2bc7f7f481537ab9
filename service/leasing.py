"""Leases: acquire, renew, release, revoke, expire, and handing ready workers to pending leases.

Every function here runs inside the caller's transaction (``session``) and takes
``now`` from the caller's clock. Acquiring from the warm pool is one short
transaction: claim the oldest ready worker (row lock, ``SKIP LOCKED`` on
PostgreSQL), insert the lease, commit. The database's unique indexes make a
second live lease for the same tenant and pool, or a second lease on the same
worker, impossible; callers turn the ``IntegrityError`` into "return the
existing lease".
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, exists
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from service import metrics
from service.db import Prepared, with_row_locks
from service.errors import Conflict, NotFound
from service.models import (
    LIVE_LEASE_STATES,
    LIVE_TASK_STATES,
    EndReason,
    Lease,
    LeaseState,
    Pool,
    Task,
    Worker,
    WorkerState,
)
from service.security import new_id
from service.states import move_lease, move_worker, record
from service.tasks import end_lease_tasks

END_STATE_FOR_REASON = {
    EndReason.RELEASED: LeaseState.RELEASED,
    EndReason.IDLE_TIMEOUT: LeaseState.EXPIRED,
    EndReason.MAX_LIFETIME: LeaseState.EXPIRED,
    EndReason.REVOKED: LeaseState.REVOKED,
    EndReason.FAILED: LeaseState.FAILED,
}


class Outcome(enum.Enum):
    ACTIVE = "active"  # a ready worker was assigned now (201)
    PENDING = "pending"  # queued until a worker is ready (202)
    EXISTING = "existing"  # the tenant already holds a live lease on the pool (200)


@dataclass(frozen=True)
class Acquired:
    lease: Lease
    outcome: Outcome
    # The rows the lease was made from. Holding them keeps them in the session's
    # (weak) identity map, so the answer is built without reading them again.
    worker: Worker | None = None
    pool: Pool | None = None


# ---- acquire ----------------------------------------------------------------


def acquire(session: Session, tenant_id: str, pool_name: str, now: datetime) -> Acquired:
    """Lease a worker for the tenant, or queue a pending lease, or return the live one.

    May roll the session back: when a concurrent request of the same tenant wins
    the unique index, the answer is that request's lease.
    """
    try:
        return _acquire(session, tenant_id, pool_name, now)
    except IntegrityError:
        session.rollback()
        existing = live_lease(session, tenant_id, pool_name)
        if existing is None:
            raise
        return Acquired(existing, Outcome.EXISTING)


def _acquire(session: Session, tenant_id: str, pool_name: str, now: datetime) -> Acquired:
    pool = enabled_pool(session, pool_name)
    existing = live_lease(session, tenant_id, pool_name)
    if existing is not None:
        return Acquired(existing, Outcome.EXISTING)
    lease = Lease(
        id=new_id("l"),
        tenant_id=tenant_id,
        pool=pool.name,
        state=LeaseState.PENDING,
        created_at=now,
    )
    # First come, first served: while others wait, a newcomer queues behind them.
    worker = None if _has_pending(session, pool.name) else _claim_ready_worker(session, pool.name)
    if worker is None:
        lease.pending_expires_at = now + timedelta(seconds=pool.pending_timeout_s)
        session.add(lease)
        _record_created(session, lease, now)
        session.flush()
        return Acquired(lease, Outcome.PENDING)
    session.add(lease)
    _record_created(session, lease, now)
    _assign(session, lease, worker, pool, now)
    session.flush()  # one INSERT of the active lease; the unique indexes speak here
    return Acquired(lease, Outcome.ACTIVE, worker, pool)


def enabled_pool(session: Session, pool_name: str) -> Pool:
    pool = session.get(Pool, pool_name)
    if pool is None or not pool.enabled:
        raise NotFound(f"no enabled pool named {pool_name!r}")
    return pool


# The warm lease's statements, built once (see ``Prepared``).
_LIVE_LEASE = select(Lease).where(
    Lease.tenant_id == bindparam("tenant_id"),
    Lease.pool == bindparam("pool"),
    col(Lease.state).in_(LIVE_LEASE_STATES),
)
_ANY_PENDING = (
    select(Lease.id)
    .where(Lease.state == LeaseState.PENDING, Lease.pool == bindparam("pool"))
    .limit(1)
)
_OLDEST_READY_WORKER = Prepared(
    select(Worker)
    .where(Worker.pool == bindparam("pool"), Worker.state == WorkerState.READY)
    .order_by(col(Worker.ready_at), col(Worker.id))
    .limit(1)
)
_TENANT_LEASE = Prepared(
    select(Lease).where(
        Lease.id == bindparam("lease_id"), Lease.tenant_id == bindparam("tenant_id")
    ),
    skip_locked=False,
)


def live_lease(session: Session, tenant_id: str, pool_name: str) -> Lease | None:
    return session.exec(_LIVE_LEASE, params={"tenant_id": tenant_id, "pool": pool_name}).first()


def _has_pending(session: Session, pool_name: str) -> bool:
    return session.exec(_ANY_PENDING, params={"pool": pool_name}).first() is not None


def _claim_ready_worker(session: Session, pool_name: str) -> Worker | None:
    statement = _OLDEST_READY_WORKER.for_update(session)
    return session.exec(statement, params={"pool": pool_name}).first()


def _assign(session: Session, lease: Lease, worker: Worker, pool: Pool, now: datetime) -> None:
    move_worker(session, worker, WorkerState.LEASED, f"leased by {lease.id}", now)
    lease.worker_id = worker.id
    lease.activated_at = now
    lease.idle_expires_at = now + timedelta(seconds=pool.lease_idle_timeout_s)
    lease.expires_at = now + timedelta(seconds=pool.lease_max_lifetime_s)
    lease.pending_expires_at = None
    move_lease(session, lease, LeaseState.ACTIVE, f"worker {worker.id} assigned", now)
    metrics.LEASE_WAIT.labels(pool.name).observe((now - lease.created_at).total_seconds())


def _record_created(session: Session, lease: Lease, now: datetime) -> None:
    record(
        session,
        "lease",
        lease.id,
        "requested",
        now,
        pool=lease.pool,
        tenant_id=lease.tenant_id,
        to_state=LeaseState.PENDING,
    )


# ---- pending leases meet ready workers --------------------------------------


def serve_pending(session: Session, pool: Pool, now: datetime) -> list[Lease]:
    """Hand ready workers to pending leases of the pool, oldest lease and oldest worker first."""
    if not pool.enabled:
        return []
    pending_q = (
        select(Lease)
        .where(Lease.pool == pool.name, Lease.state == LeaseState.PENDING)
        .order_by(col(Lease.created_at), col(Lease.id))
    )
    activated: list[Lease] = []
    for lease in session.exec(with_row_locks(pending_q, session)).all():
        worker = _claim_ready_worker(session, pool.name)
        if worker is None:
            break
        _assign(session, lease, worker, pool, now)
        activated.append(lease)
    return activated


def serve_pending_of(session: Session, pool_name: str, now: datetime) -> list[Lease]:
    pool = session.get(Pool, pool_name)
    return serve_pending(session, pool, now) if pool is not None else []


def settled_leases(session: Session, lease_ids: Collection[str]) -> set[str]:
    """The leases among ``lease_ids`` that are no longer pending (one query for all)."""
    statement = select(Lease.id).where(
        col(Lease.id).in_(list(lease_ids)), Lease.state != LeaseState.PENDING
    )
    return set(session.exec(statement).all())


def serve_all_pending(session: Session, now: datetime) -> list[Lease]:
    activated: list[Lease] = []
    for pool in session.exec(select(Pool)).all():
        activated += serve_pending(session, pool, now)
    return activated


# ---- renew / release / revoke -------------------------------------------------


def tenant_lease(session: Session, tenant_id: str, lease_id: str, *, lock: bool = False) -> Lease:
    """The tenant's lease, or 404 (another tenant's lease is never revealed)."""
    statement = _TENANT_LEASE.for_update(session) if lock else _TENANT_LEASE.plain
    lease = session.exec(statement, params={"lease_id": lease_id, "tenant_id": tenant_id}).first()
    if lease is None:
        raise NotFound(f"no lease {lease_id!r}")
    return lease


def renew(session: Session, tenant_id: str, lease_id: str, now: datetime) -> Lease:
    lease = tenant_lease(session, tenant_id, lease_id, lock=True)
    if lease.state not in LIVE_LEASE_STATES:
        raise Conflict(f"lease {lease_id} has ended ({lease.end_reason}); request a new one")
    if lease.state == LeaseState.ACTIVE:
        pool = session.get(Pool, lease.pool)
        assert pool is not None
        lease.idle_expires_at = now + timedelta(seconds=pool.lease_idle_timeout_s)
        session.add(lease)
    return lease


def release(session: Session, tenant_id: str, lease_id: str, now: datetime) -> Lease:
    """End the lease (idempotent: an ended lease is returned as it is)."""
    lease = tenant_lease(session, tenant_id, lease_id, lock=True)
    if lease.state in LIVE_LEASE_STATES:
        end_lease(session, lease, EndReason.RELEASED, "released by tenant", now)
    return lease


def end_lease(
    session: Session, lease: Lease, reason: EndReason, detail: str, now: datetime
) -> None:
    """End a live lease; its worker, if any, goes to destroying (never reused)."""
    state = END_STATE_FOR_REASON[reason]
    if lease.state == LeaseState.PENDING and state == LeaseState.EXPIRED:
        state = LeaseState.FAILED
    move_lease(session, lease, state, detail, now)
    lease.ended_at = now
    lease.end_reason = reason
    metrics.LEASES_ENDED.labels(lease.pool, reason).inc()
    lease.pending_expires_at = None
    if lease.worker_id is not None:
        end_lease_tasks(session, lease, reason, now)
        worker = session.get(Worker, lease.worker_id)
        if worker is not None and worker.state == WorkerState.LEASED:
            schedule_destroy(session, worker, f"lease {lease.id} ended: {reason}", now)


def schedule_destroy(session: Session, worker: Worker, reason: str, now: datetime) -> None:
    move_worker(session, worker, WorkerState.DESTROYING, reason, now)
    worker.next_attempt_at = now
    worker.claimed_until = None


def revoke_lease(session: Session, lease_id: str, now: datetime, detail: str) -> Lease:
    statement = with_row_locks(
        select(Lease).where(Lease.id == lease_id), session, skip_locked=False
    )
    lease = session.exec(statement).first()
    if lease is None:
        raise NotFound(f"no lease {lease_id!r}")
    if lease.state in LIVE_LEASE_STATES:
        end_lease(session, lease, EndReason.REVOKED, detail, now)
    return lease


def end_tenant_leases(session: Session, tenant_id: str, now: datetime) -> int:
    """A disabled tenant: active leases are revoked, pending ones fail."""
    statement = select(Lease).where(
        Lease.tenant_id == tenant_id, col(Lease.state).in_(LIVE_LEASE_STATES)
    )
    leases = session.exec(with_row_locks(statement, session, skip_locked=False)).all()
    for lease in leases:
        reason = EndReason.REVOKED if lease.state == LeaseState.ACTIVE else EndReason.FAILED
        end_lease(session, lease, reason, "tenant disabled", now)
    return len(leases)


# ---- expiry -------------------------------------------------------------------


def expire(session: Session, now: datetime, batch: int = 500) -> int:
    """End active leases past their idle or lifetime deadline and pending ones past theirs.

    A lease running or queueing tasks is not idle (its idle clock restarts when its last
    task ends); its maximum lifetime still applies."""
    ended = 0
    busy = exists().where(
        col(Task.lease_id) == col(Lease.id), col(Task.state).in_(LIVE_TASK_STATES)
    )
    active_q = (
        select(Lease)
        .where(Lease.state == LeaseState.ACTIVE)
        .where(((col(Lease.idle_expires_at) <= now) & ~busy) | (col(Lease.expires_at) <= now))
        .limit(batch)
    )
    for lease in session.exec(with_row_locks(active_q, session)).all():
        assert lease.expires_at is not None
        reason = EndReason.MAX_LIFETIME if lease.expires_at <= now else EndReason.IDLE_TIMEOUT
        end_lease(session, lease, reason, f"expired: {reason}", now)
        ended += 1
    pending_q = (
        select(Lease)
        .where(Lease.state == LeaseState.PENDING, col(Lease.pending_expires_at) <= now)
        .limit(batch)
    )
    for lease in session.exec(with_row_locks(pending_q, session)).all():
        end_lease(session, lease, EndReason.FAILED, "no worker within pending_timeout", now)
        ended += 1
    return ended


def fail_pending_of_disabled_pools(session: Session, now: datetime) -> int:
    statement = (
        select(Lease)
        .join(Pool, col(Pool.name) == col(Lease.pool))
        .where(Lease.state == LeaseState.PENDING, col(Pool.enabled).is_(False))
    )
    leases = session.exec(with_row_locks(statement, session, of=Lease)).all()
    for lease in leases:
        end_lease(session, lease, EndReason.FAILED, "pool disabled or removed", now)
    return len(leases)
