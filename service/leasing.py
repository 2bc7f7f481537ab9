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
from typing import Any, Protocol

from sqlalchemy import Table, bindparam, exists, insert, literal_column, update
from sqlalchemy import select as core_select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from service import metrics
from service.db import Prepared, core_connection, transaction_connection, with_row_locks
from service.driver_sql import DriverStatement
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
from service.states import move_lease, move_worker, moved, record
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


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """What a lease's answer shows of its worker, as the warm path's statements return it."""

    id: str
    pool: str
    address: str | None
    agent_url: str | None
    access_token: str


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """A lease as the warm path wrote it (no ORM instance), with what its answer needs."""

    id: str
    tenant_id: str
    pool: str
    state: str
    worker_id: str | None
    created_at: datetime
    activated_at: datetime | None
    idle_expires_at: datetime | None
    expires_at: datetime | None
    pending_expires_at: datetime | None
    ended_at: datetime | None
    end_reason: str | None
    worker: WorkerRecord | None
    pool_os: str


@dataclass(frozen=True)
class Acquired:
    lease: Lease | LeaseRecord
    outcome: Outcome


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
    conn = transaction_connection(session)
    look = _LOOK.first(conn, {"tenant_id": tenant_id, "pool": pool_name})
    if look is None or not look.enabled:
        raise NotFound(f"no enabled pool named {pool_name!r}")
    if look.existing is not None:
        existing = live_lease(session, tenant_id, pool_name)
        if existing is not None:
            return Acquired(existing, Outcome.EXISTING)
        # Ended between the two statements (PostgreSQL reads each statement's own
        # snapshot): the tenant holds nothing now, so look again from the start.
        return _acquire(session, tenant_id, pool_name, now)
    # First come, first served: while others wait, a newcomer queues behind them.
    if not look.queued:
        claim = _CLAIM_SQLITE if conn.dialect.name == "sqlite" else _CLAIM_LOCKED
        worker = claim.first(conn, {"b_pool": pool_name, "now": now})
        if worker is not None:
            lease_record = _insert_active(session, conn, tenant_id, look, worker, now)
            return Acquired(lease_record, Outcome.ACTIVE)
    lease = Lease(
        id=new_id("l"),
        tenant_id=tenant_id,
        pool=pool_name,
        state=LeaseState.PENDING,
        created_at=now,
        pending_expires_at=now + timedelta(seconds=look.pending_timeout_s),
    )
    session.add(lease)
    _record_created(session, lease, now)
    session.flush()
    return Acquired(lease, Outcome.PENDING)


def _insert_active(
    session: Session, conn: Connection, tenant_id: str, look: Any, worker: Any, now: datetime
) -> LeaseRecord:
    """The warm lease: one INSERT of the active lease, its audit rows written with it.

    The claim already moved the worker ``ready -> leased`` (its ``WHERE`` holds the
    row at ``ready``); the moves are checked against the tables here.
    """
    lease = LeaseRecord(
        id=new_id("l"),
        tenant_id=tenant_id,
        pool=worker.pool,
        state=LeaseState.ACTIVE,
        worker_id=worker.id,
        created_at=now,
        activated_at=now,
        idle_expires_at=now + timedelta(seconds=look.lease_idle_timeout_s),
        expires_at=now + timedelta(seconds=look.lease_max_lifetime_s),
        pending_expires_at=None,
        ended_at=None,
        end_reason=None,
        worker=WorkerRecord(
            worker.id, worker.pool, worker.address, worker.agent_url, worker.access_token
        ),
        pool_os=look.os,
    )
    _record_created(session, lease, now)
    moved(
        session,
        "worker",
        worker.id,
        WorkerState.READY,
        WorkerState.LEASED,
        f"leased by {lease.id}",
        now,
        pool=worker.pool,
    )
    moved(
        session,
        "lease",
        lease.id,
        LeaseState.PENDING,
        LeaseState.ACTIVE,
        f"worker {worker.id} assigned",
        now,
        pool=lease.pool,
        tenant_id=tenant_id,
    )
    _INSERT_LEASE.run(
        conn,
        {
            "id": lease.id,
            "tenant_id": tenant_id,
            "pool": lease.pool,
            "state": lease.state,
            "worker_id": worker.id,
            "created_at": now,
            "activated_at": now,
            "idle_expires_at": lease.idle_expires_at,
            "expires_at": lease.expires_at,
        },
    )  # the unique indexes speak here
    metrics.LEASE_WAIT.labels(lease.pool).observe(0.0)
    return lease


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


# The warm path in Core, run on the driver's cursor (``DriverStatement``, issue 15): no
# ORM instance is built or flushed. The invariants stay where they were, in the
# database: the unique indexes on leases, the claim's row lock (FOR UPDATE SKIP LOCKED
# on PostgreSQL; BEGIN IMMEDIATE on SQLite) and the claim's ``state = 'ready'``.
_W: Table = Worker.__table__  # type: ignore[attr-defined]
_L: Table = Lease.__table__  # type: ignore[attr-defined]
_P: Table = Pool.__table__  # type: ignore[attr-defined]
_T: Table = Task.__table__  # type: ignore[attr-defined]
# Literals, not bound values: SQLite matches the partial live-lease index only to the
# same IN list (see ``models._LIVE_LEASE_SQL``).
_LIVE: list[Any] = [literal_column(f"'{state}'") for state in LIVE_LEASE_STATES]

# The pool's settings, the tenant's live lease and whether anyone queues: one SELECT.
_LOOK = DriverStatement(
    core_select(
        _P.c.enabled,
        _P.c.os,
        _P.c.pending_timeout_s,
        _P.c.lease_idle_timeout_s,
        _P.c.lease_max_lifetime_s,
        core_select(_L.c.id)
        .where(
            _L.c.tenant_id == bindparam("tenant_id"), _L.c.pool == _P.c.name, _L.c.state.in_(_LIVE)
        )
        .limit(1)
        .scalar_subquery()
        .label("existing"),
        exists()
        .where(_L.c.state == literal_column("'pending'"), _L.c.pool == _P.c.name)
        .label("queued"),
    ).where(_P.c.name == bindparam("pool"))
)


def _claim(*, lock: bool) -> Any:
    """Move the oldest ready worker of the pool to leased and return it (one statement)."""
    oldest = (
        core_select(_W.c.id)
        .where(_W.c.pool == bindparam("b_pool"), _W.c.state == literal_column("'ready'"))
        .order_by(_W.c.ready_at, _W.c.id)
        .limit(1)
    )
    if lock:
        oldest = oldest.with_for_update(skip_locked=True)
    return (
        update(_W)
        .where(_W.c.id == oldest.scalar_subquery(), _W.c.state == literal_column("'ready'"))
        .values(state=WorkerState.LEASED.value, state_changed_at=bindparam("now"))
        .returning(_W.c.id, _W.c.pool, _W.c.address, _W.c.agent_url, _W.c.access_token)
    )


_CLAIM_SQLITE = DriverStatement(_claim(lock=False))
_CLAIM_LOCKED = DriverStatement(_claim(lock=True))
_INSERT_LEASE = DriverStatement(
    insert(_L).values(
        {
            name: bindparam(name)
            for name in (
                "id",
                "tenant_id",
                "pool",
                "state",
                "worker_id",
                "created_at",
                "activated_at",
                "idle_expires_at",
                "expires_at",
            )
        }
    )
)


def live_lease(session: Session, tenant_id: str, pool_name: str) -> Lease | None:
    return session.exec(_LIVE_LEASE, params={"tenant_id": tenant_id, "pool": pool_name}).first()


def _claim_ready_worker(session: Session, pool_name: str) -> Worker | None:
    statement = _OLDEST_READY_WORKER.for_update(session)
    return session.exec(statement, params={"pool": pool_name}).first()


class ServingPool(Protocol):
    """What serving a pool's queue reads of its row: a ``Pool``, or just those columns."""

    @property
    def name(self) -> str: ...
    @property
    def lease_idle_timeout_s(self) -> int: ...
    @property
    def lease_max_lifetime_s(self) -> int: ...


def _assign(
    session: Session, lease: Lease, worker: Worker, pool: ServingPool, now: datetime
) -> None:
    move_worker(session, worker, WorkerState.LEASED, f"leased by {lease.id}", now)
    lease.worker_id = worker.id
    lease.activated_at = now
    lease.idle_expires_at = now + timedelta(seconds=pool.lease_idle_timeout_s)
    lease.expires_at = now + timedelta(seconds=pool.lease_max_lifetime_s)
    lease.pending_expires_at = None
    move_lease(session, lease, LeaseState.ACTIVE, f"worker {worker.id} assigned", now)
    metrics.LEASE_WAIT.labels(pool.name).observe((now - lease.created_at).total_seconds())


def _record_created(session: Session, lease: Lease | LeaseRecord, now: datetime) -> None:
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
    if not pool.enabled or not any_pending(session, pool.name):
        return []
    return _serve_waiting(session, pool, now)


def _serve_waiting(session: Session, pool: ServingPool, now: datetime) -> list[Lease]:
    activated: list[Lease] = []
    pending = _PENDING_OF_POOL.for_update(session)
    for lease in session.exec(pending, params={"pool": pool.name}).all():
        worker = _claim_ready_worker(session, pool.name)
        if worker is None:
            break
        _assign(session, lease, worker, pool, now)
        activated.append(lease)
    return activated


# Every ready callback and every full pass asks (see ``Prepared``).
_PENDING_OF_POOL = Prepared(
    select(Lease)
    .where(Lease.pool == bindparam("pool"), Lease.state == LeaseState.PENDING)
    .order_by(col(Lease.created_at), col(Lease.id))
)


# On the driver's cursor (``DriverStatement``): through SQLAlchemy's execution this look
# took most of the ready callback's time in simulate's profile.
_ANY_PENDING_OF_POOL = DriverStatement(
    core_select(_L.c.id)
    .where(_L.c.pool == bindparam("pool"), _L.c.state == LeaseState.PENDING.value)
    .limit(1)
)


def any_pending(session: Session, pool_name: str) -> bool:
    """Whether a lease of the pool waits. Most ready callbacks and passes find none: one
    Core look first, the ORM's load (and lock) only for leases there are."""
    look = _ANY_PENDING_OF_POOL.first(core_connection(session), {"pool": pool_name})
    return look is not None


# A worker to hand out, and the pool's settings serving needs: Core looks, so a queue
# with no ready worker (a request that just queued, the full pass while workers boot)
# loads no ORM object, and serving reads four columns of the pool, not its row (the
# ORM's ``get`` of the pool was ~2 % of a replayed week).
_ANY_READY_OF_POOL = DriverStatement(
    core_select(_W.c.id)
    .where(_W.c.pool == bindparam("pool"), _W.c.state == WorkerState.READY.value)
    .limit(1)
)
_SERVING_POOL = DriverStatement(
    core_select(
        _P.c.name, _P.c.enabled, _P.c.lease_idle_timeout_s, _P.c.lease_max_lifetime_s
    ).where(_P.c.name == bindparam("pool"))
)


def serve_pending_of(session: Session, pool_name: str, now: datetime) -> list[Lease]:
    """``serve_pending`` by the pool's name: only when a lease waits and a worker is ready
    (the claim then takes it under its lock, or finds none)."""
    if not any_pending(session, pool_name):
        return []
    connection = core_connection(session)
    if _ANY_READY_OF_POOL.first(connection, {"pool": pool_name}) is None:
        return []
    pool = _SERVING_POOL.first(connection, {"pool": pool_name})
    if pool is None or not pool.enabled:
        return []
    return _serve_waiting(session, pool, now)


def settled_leases(session: Session, lease_ids: Collection[str]) -> set[str]:
    """The leases among ``lease_ids`` that are no longer pending (one query for all)."""
    statement = select(Lease.id).where(
        col(Lease.id).in_(list(lease_ids)), Lease.state != LeaseState.PENDING
    )
    return set(session.exec(statement).all())


# Every full pass asks and nearly always finds no lease waiting: one look on the driver's
# cursor for the pools that have some, not an ORM load of every pool (simulate's profile).
_POOLS_WITH_PENDING = DriverStatement(
    core_select(_L.c.pool)
    .where(_L.c.state == LeaseState.PENDING.value)
    .group_by(_L.c.pool)
    .order_by(_L.c.pool)
)


def serve_all_pending(session: Session, now: datetime) -> list[Lease]:
    activated: list[Lease] = []
    for (pool_name,) in _POOLS_WITH_PENDING.all(core_connection(session), {}):
        activated += serve_pending_of(session, pool_name, now)
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


def release(session: Session, tenant_id: str, lease_id: str, now: datetime) -> Lease | LeaseRecord:
    """End the lease (idempotent: an ended lease is returned as it is)."""
    released = _release_active(session, tenant_id, lease_id, now)
    if released is not None:
        return released
    # Pending, already ended, or not the tenant's: the ORM path.
    lease = tenant_lease(session, tenant_id, lease_id, lock=True)
    if lease.state in LIVE_LEASE_STATES:
        end_lease(session, lease, EndReason.RELEASED, "released by tenant", now)
    return lease


_END_ACTIVE = DriverStatement(
    update(_L)
    .where(
        _L.c.id == bindparam("lease_id"),
        _L.c.tenant_id == bindparam("b_tenant_id"),
        _L.c.state == literal_column("'active'"),
    )
    .values(
        state=LeaseState.RELEASED.value,
        ended_at=bindparam("now"),
        end_reason=EndReason.RELEASED.value,
        pending_expires_at=None,
    )
    .returning(
        *_L.c,
        exists()
        .where(_T.c.lease_id == bindparam("lease_id"), _T.c.state.in_(LIVE_TASK_STATES))
        .label("busy"),
    )
)
# (RETURNING renders its columns unqualified: the subqueries name their values.)
_POOL_OS = (
    core_select(_P.c.os)
    .where(_P.c.name == bindparam("pool_name"))
    .scalar_subquery()
    .label("pool_os")
)
_DESTROY_LEASED = DriverStatement(
    update(_W)
    .where(_W.c.id == bindparam("worker_id"), _W.c.state == literal_column("'leased'"))
    .values(
        state=WorkerState.DESTROYING.value,
        state_changed_at=bindparam("now"),
        next_attempt_at=bindparam("now"),
        claimed_until=None,
    )
    .returning(_W.c.id, _W.c.pool, _W.c.address, _W.c.agent_url, _W.c.access_token, _POOL_OS)
)
_WORKER_SHOWN = DriverStatement(
    core_select(
        _W.c.id, _W.c.pool, _W.c.address, _W.c.agent_url, _W.c.access_token, _POOL_OS
    ).where(_W.c.id == bindparam("worker_id"))
)


def _release_active(
    session: Session, tenant_id: str, lease_id: str, now: datetime
) -> LeaseRecord | None:
    """The warm release in Core: end the tenant's active lease, end its tasks, send its
    worker to destroying, as ``end_lease`` does; None when the lease is not active."""
    conn = transaction_connection(session)
    reason = EndReason.RELEASED
    params = {"lease_id": lease_id, "b_tenant_id": tenant_id, "now": now}
    ended = _END_ACTIVE.first(conn, params)
    if ended is None:
        return None
    assert ended.worker_id is not None  # an active lease has its worker
    moved(
        session,
        "lease",
        lease_id,
        LeaseState.ACTIVE,
        LeaseState.RELEASED,
        "released by tenant",
        now,
        pool=ended.pool,
        tenant_id=tenant_id,
    )
    metrics.LEASES_ENDED.labels(ended.pool, reason).inc()
    if ended.busy:
        end_lease_tasks(session, lease_id, reason, now)
    worker_params = {"worker_id": ended.worker_id, "now": now, "pool_name": ended.pool}
    worker = _DESTROY_LEASED.first(conn, worker_params)
    if worker is not None:
        moved(
            session,
            "worker",
            worker.id,
            WorkerState.LEASED,
            WorkerState.DESTROYING,
            f"lease {lease_id} ended: {reason}",
            now,
            pool=worker.pool,
        )
    else:  # failed meanwhile: the destroy pass has it already
        worker = _WORKER_SHOWN.first(conn, worker_params)
    assert worker is not None
    return LeaseRecord(
        id=lease_id,
        tenant_id=tenant_id,
        pool=ended.pool,
        state=LeaseState.RELEASED,
        worker_id=ended.worker_id,
        created_at=ended.created_at,
        activated_at=ended.activated_at,
        idle_expires_at=ended.idle_expires_at,
        expires_at=ended.expires_at,
        pending_expires_at=None,
        ended_at=now,
        end_reason=reason,
        worker=WorkerRecord(
            worker.id, worker.pool, worker.address, worker.agent_url, worker.access_token
        ),
        pool_os=worker.pool_os or "",
    )


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
        end_lease_tasks(session, lease.id, reason, now)
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
    params = {"now": now, "batch": batch}
    for lease in session.exec(_EXPIRED_ACTIVE.for_update(session), params=params).all():
        assert lease.expires_at is not None
        reason = EndReason.MAX_LIFETIME if lease.expires_at <= now else EndReason.IDLE_TIMEOUT
        end_lease(session, lease, reason, f"expired: {reason}", now)
        ended += 1
    for lease in session.exec(_EXPIRED_PENDING.for_update(session), params=params).all():
        end_lease(session, lease, EndReason.FAILED, "no worker within pending_timeout", now)
        ended += 1
    return ended


# Built once (``Prepared``): building them and their cache keys was most of an expiry
# transaction's ~5 ms (simulate's profile, ~100 a replayed week).
_BUSY = exists().where(col(Task.lease_id) == col(Lease.id), col(Task.state).in_(LIVE_TASK_STATES))
_EXPIRED_ACTIVE = Prepared(
    select(Lease)
    .where(Lease.state == LeaseState.ACTIVE)
    .where(
        ((col(Lease.idle_expires_at) <= bindparam("now")) & ~_BUSY)
        | (col(Lease.expires_at) <= bindparam("now"))
    )
    .limit(bindparam("batch"))
)
_EXPIRED_PENDING = Prepared(
    select(Lease)
    .where(Lease.state == LeaseState.PENDING, col(Lease.pending_expires_at) <= bindparam("now"))
    .limit(bindparam("batch"))
)


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
