"""Worker lifecycle: agent callback, create, destroy, health checks and reconciliation.

The passes here are what the scheduler runs. Each is a plain function of
``(factory, provisioners, now)`` that a test can call with a fixed clock. Work
is claimed in the database first (``claimed_until`` under a row lock), then
provisioner calls happen outside any transaction, then the result is written
in a new short transaction. So several replicas can run the same pass at once,
and a crash at any point leaves rows a later pass picks up again.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Collection, Iterable
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

from sqlalchemy import select as sa_select
from sqlalchemy import update
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from provisioners import (
    ProvisionerError,
    ResourceState,
    WorkerHandle,
    WorkerSpec,
)
from service import metrics
from service.db import session_scope, with_row_locks
from service.errors import Conflict, NotFound, Unauthorized
from service.leasing import end_lease, schedule_destroy, serve_pending
from service.models import (
    LIVE_WORKER_STATES,
    EndReason,
    Lease,
    LeaseState,
    Pool,
    Worker,
    WorkerState,
)
from service.pools import note_create_result
from service.provisioning import ProvisionerSet
from service.security import secret_equals
from service.states import move_worker

log = logging.getLogger("workerlease.workers")

# A claim outlives the slowest provisioner call (EC2 creates may wait on the rate limiter);
# after a crash the claimed rows are picked up again once it lapses.
CLAIM_FOR = timedelta(seconds=90)
MAX_DESTROY_BACKOFF_S = 600


def release_claims(session: Session) -> int:
    """Forget every create/destroy claim: called when a scheduler starts.

    A scheduler that was killed leaves claims that would otherwise block its workers
    until they lapse. Taking them back early is safe because every provisioner call is
    idempotent per worker id: at worst a call still running in another replica is
    made a second time.
    """
    statement = (
        update(Worker)
        .where(col(Worker.claimed_until).is_not(None))
        .where(col(Worker.state).in_((WorkerState.PROVISIONING, WorkerState.DESTROYING)))
        .values(claimed_until=None)
    )
    result = session.execute(statement)
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


# ---- the agent's ready callback --------------------------------------------------


def worker_ready(
    session: Session,
    worker_id: str,
    bootstrap_token: str,
    agent_url: str,
    address: str | None,
    now: datetime,
) -> tuple[Worker, list[Lease]]:
    """Mark a provisioning worker ready (one-time bootstrap token) and serve waiting leases."""
    statement = with_row_locks(
        select(Worker).where(Worker.id == worker_id), session, skip_locked=False
    )
    worker = session.exec(statement).first()
    if worker is None:
        raise NotFound(f"no worker {worker_id!r}")
    if worker.bootstrap_token is None or not secret_equals(bootstrap_token, worker.bootstrap_token):
        raise Unauthorized("invalid or already used bootstrap token")
    if worker.state != WorkerState.PROVISIONING:
        raise Conflict(f"worker {worker_id} is {worker.state}, not provisioning")
    mark_ready(session, worker, agent_url, address, now)
    pool = session.get(Pool, worker.pool)
    assert pool is not None
    return worker, serve_pending(session, pool, now)


def mark_ready(
    session: Session, worker: Worker, agent_url: str | None, address: str | None, now: datetime
) -> None:
    worker.agent_url = agent_url
    worker.address = address or worker.address
    worker.ready_at = now
    worker.bootstrap_token = None
    move_worker(session, worker, WorkerState.READY, "agent reported ready", now)
    metrics.PROVISIONING.labels(worker.pool).observe((now - worker.created_at).total_seconds())


# ---- create ----------------------------------------------------------------------


def claim_creates(
    session: Session, pool: str, now: datetime, limit: int, skip: Collection[str] = ()
) -> list[Worker]:
    """Provisioning rows of the pool whose resource was not requested (or whose claim lapsed).

    ``skip``: worker ids whose create is still running in this process.
    """
    statement = (
        select(Worker)
        .where(
            Worker.pool == pool,
            Worker.state == WorkerState.PROVISIONING,
            col(Worker.provider_id).is_(None),
        )
        .where(col(Worker.claimed_until).is_(None) | (col(Worker.claimed_until) < now))
        .order_by(col(Worker.created_at))
        .limit(limit)
    )
    if skip:
        statement = statement.where(col(Worker.id).not_in(list(skip)))
    workers = list(session.exec(with_row_locks(statement, session)).all())
    for worker in workers:
        worker.claimed_until = now + CLAIM_FOR
        worker.create_attempts += 1
        session.add(worker)
    return workers


def create_one(
    factory: sessionmaker[Session],
    provisioners: ProvisionerSet,
    pool: Pool,
    worker: Worker,
    now: datetime,
) -> None:
    spec = WorkerSpec(
        worker_id=worker.id,
        pool=pool.name,
        os=pool.os,
        deployment_id=provisioners.deployment.deployment_id,
        service_url=provisioners.deployment.service_url,
        bootstrap_token=worker.bootstrap_token or "",
    )
    try:
        handle = provisioners.for_pool(pool).create(spec)
    except Exception as exc:
        _record_create_failure(factory, pool.name, worker.id, exc, now)
        return
    with session_scope(factory) as session:
        row = session.get(Worker, worker.id)
        pool_row = session.get(Pool, pool.name)
        if row is not None:
            row.provider_id = handle.provider_id
            row.address = row.address or handle.address
            row.claimed_until = None
            session.add(row)
        if pool_row is not None:
            note_create_result(pool_row, None, now)
            session.add(pool_row)
    log.info(
        "worker_created pool=%s worker=%s provider_id=%s", pool.name, worker.id, handle.provider_id
    )


def _record_create_failure(
    factory: sessionmaker[Session], pool_name: str, worker_id: str, exc: Exception, now: datetime
) -> None:
    kind = _error_kind(exc)
    metrics.PROVISIONER_ERRORS.labels(pool_name, "create", kind).inc()
    log.warning(
        "worker_create_failed pool=%s worker=%s kind=%s error=%s",
        pool_name,
        worker_id,
        kind,
        exc,
        exc_info=not isinstance(exc, ProvisionerError),
    )
    with session_scope(factory) as session:
        row = session.get(Worker, worker_id)
        pool = session.get(Pool, pool_name)
        if row is not None and row.state == WorkerState.PROVISIONING:
            row.last_error = f"create: {exc}"[:1000]
            move_worker(session, row, WorkerState.FAILED, f"create failed ({kind})", now)
            # Destroy too: a half-created resource must not outlive its row.
            schedule_destroy(session, row, "cleanup after failed create", now)
        if pool is not None:
            note_create_result(pool, f"{kind}: {exc}", now)
            session.add(pool)


def _error_kind(exc: Exception) -> str:
    """The metric label: the provisioner's own error class, so causes stay distinct."""
    if isinstance(exc, ProvisionerError):
        return type(exc).__name__
    return "unexpected"


# ---- destroy ---------------------------------------------------------------------


def claim_destroys(session: Session, pool: str, now: datetime, limit: int = 500) -> list[Worker]:
    statement = (
        select(Worker)
        .where(Worker.pool == pool, Worker.state == WorkerState.DESTROYING)
        .where(col(Worker.next_attempt_at).is_(None) | (col(Worker.next_attempt_at) <= now))
        .where(col(Worker.claimed_until).is_(None) | (col(Worker.claimed_until) < now))
        .order_by(col(Worker.next_attempt_at))
        .limit(limit)
    )
    workers = list(session.exec(with_row_locks(statement, session)).all())
    for worker in workers:
        worker.claimed_until = now + CLAIM_FOR
        session.add(worker)
    return workers


def destroy_workers(
    factory: sessionmaker[Session],
    provisioners: ProvisionerSet,
    pool: Pool,
    workers: list[Worker],
    now: datetime,
) -> int:
    """Destroy one pool's claimed workers; ``destroyed`` only once the provisioner confirms."""
    handles = [handle_of(w) for w in workers]
    try:
        results = provisioners.for_pool(pool).destroy_many(handles)
    except Exception as exc:  # a provisioner bug is retried like any failure
        results = {h.worker_id: exc for h in handles}
    destroyed = 0
    with session_scope(factory) as session:
        for worker_id, error in results.items():
            row = session.get(Worker, worker_id)
            if row is None or row.state != WorkerState.DESTROYING:
                continue
            if error is None:
                _finish_destroy(session, row, now)
                destroyed += 1
            else:
                _retry_destroy_later(row, error, now)
                session.add(row)
    return destroyed


def _finish_destroy(session: Session, worker: Worker, now: datetime) -> None:
    worker.claimed_until = None
    worker.next_attempt_at = None
    worker.bootstrap_token = None
    move_worker(session, worker, WorkerState.DESTROYED, "provisioner confirmed", now)
    log.info("worker_destroyed pool=%s worker=%s", worker.pool, worker.id)


def _retry_destroy_later(worker: Worker, error: Exception, now: datetime) -> None:
    kind = _error_kind(error)
    metrics.PROVISIONER_ERRORS.labels(worker.pool, "destroy", kind).inc()
    log.warning(
        "worker_destroy_failed pool=%s worker=%s attempt=%d error=%s",
        worker.pool,
        worker.id,
        worker.destroy_attempts + 1,
        error,
    )
    worker.destroy_attempts += 1
    delay = min(MAX_DESTROY_BACKOFF_S, 2 ** min(worker.destroy_attempts, 10))
    worker.next_attempt_at = now + timedelta(seconds=delay)
    worker.claimed_until = None
    worker.last_error = f"destroy: {error}"[:1000]


class WorkerLocation(Protocol):
    """What finds a worker's resource: a ``Worker`` row, or just those columns."""

    @property
    def id(self) -> str: ...
    @property
    def pool(self) -> str: ...
    @property
    def provider_id(self) -> str | None: ...
    @property
    def address(self) -> str | None: ...


_Located = TypeVar("_Located", bound=WorkerLocation)


def handle_of(worker: WorkerLocation) -> WorkerHandle:
    # provider_id may be empty when create never returned: provisioners then find the
    # resource by its worker-id label.
    return WorkerHandle(
        worker_id=worker.id,
        pool=worker.pool,
        provider_id=worker.provider_id or "",
        address=worker.address,
    )


def _group_by_pool(workers: Iterable[_Located]) -> dict[str, list[_Located]]:
    grouped: dict[str, list[_Located]] = defaultdict(list)
    for worker in workers:
        grouped[worker.pool].append(worker)
    return grouped


# ---- health and timeouts ---------------------------------------------------------


def fail_worker(session: Session, worker: Worker, reason: str, now: datetime) -> None:
    """The worker is dead: fail it, fail its lease, and destroy what is left of it."""
    move_worker(session, worker, WorkerState.FAILED, reason, now)
    lease = session.exec(select(Lease).where(Lease.worker_id == worker.id)).first()
    if lease is not None and lease.state == LeaseState.ACTIVE:
        end_lease(session, lease, EndReason.FAILED, f"worker failed: {reason}", now)
    schedule_destroy(session, worker, "cleanup of failed worker", now)


def provision_timeouts(session: Session, now: datetime) -> int:
    """Workers not ready within their pool's provision_timeout are destroyed (and replaced)."""
    statement = (
        select(Worker, Pool)
        .join(Pool, col(Pool.name) == col(Worker.pool))
        .where(Worker.state == WorkerState.PROVISIONING)
    )
    expired = [
        w
        for w, pool in session.exec(statement).all()
        if w.created_at + timedelta(seconds=pool.provision_timeout_s) <= now
    ]
    for worker in expired:
        locked = session.exec(
            with_row_locks(select(Worker).where(Worker.id == worker.id), session)
        ).first()
        if locked is not None and locked.state == WorkerState.PROVISIONING:
            fail_worker(session, locked, "provision timeout", now)
    return len(expired)


def check_health(
    factory: sessionmaker[Session], provisioners: ProvisionerSet, now: datetime
) -> int:
    """Ask provisioners about running workers; the dead fail, RUNNING may mean ready."""
    with session_scope(factory) as session:
        pools = {p.name: p for p in session.exec(select(Pool)).all()}
        # Plain columns, not Worker objects: this reads every running worker on every
        # pass, and building ORM objects (tokens decrypted) was most of its cost.
        statement = sa_select(
            col(Worker.id),
            col(Worker.pool),
            col(Worker.state),
            col(Worker.provider_id),
            col(Worker.address),
        ).where(
            col(Worker.state).in_(
                (WorkerState.PROVISIONING, WorkerState.READY, WorkerState.LEASED)
            ),
            col(Worker.provider_id).is_not(None),
        )
        workers = list(session.execute(statement).all())
    changed = 0
    for pool_name, pool_workers in _group_by_pool(workers).items():
        provisioner = provisioners.for_pool(pools[pool_name])
        try:
            states = provisioner.describe([handle_of(w) for w in pool_workers])
        except Exception as exc:
            metrics.PROVISIONER_ERRORS.labels(pool_name, "describe", _error_kind(exc)).inc()
            log.warning("describe_failed pool=%s error=%s", pool_name, exc)
            continue
        needing_change = [
            w
            for w in pool_workers
            if _change_for(w.state, states.get(w.id), provisioner.ready_when_running) is not None
        ]
        # Only the rows that change are locked, in one statement: locking every running
        # worker would make concurrent lease requests skip (SKIP LOCKED) healthy ones.
        if needing_change:
            with session_scope(factory) as session:
                changed += _apply_observed_states(
                    session, provisioner.ready_when_running, needing_change, states, now
                )
    return changed


def _change_for(state: str, observed: ResourceState | None, ready_when_running: bool) -> str | None:
    """What an observation means for a worker in ``state``: ``failed``, ``ready`` or nothing."""
    if observed == ResourceState.GONE and state in (
        WorkerState.PROVISIONING,
        WorkerState.READY,
        WorkerState.LEASED,
    ):
        return WorkerState.FAILED
    if (
        observed == ResourceState.RUNNING
        and ready_when_running
        and state == WorkerState.PROVISIONING
    ):
        return WorkerState.READY
    return None


def _apply_observed_states(
    session: Session,
    ready_when_running: bool,
    workers: list[_Located],
    states: dict[str, ResourceState],
    now: datetime,
) -> int:
    statement = select(Worker).where(col(Worker.id).in_([w.id for w in workers]))
    changed = 0
    for worker in session.exec(with_row_locks(statement, session)).all():
        # Re-checked under the lock: the worker may have moved since it was described.
        change = _change_for(worker.state, states.get(worker.id), ready_when_running)
        if change == WorkerState.FAILED:
            fail_worker(session, worker, "resource gone", now)
        elif change == WorkerState.READY:
            mark_ready(session, worker, None, worker.address, now)
            pool = session.get(Pool, worker.pool)
            assert pool is not None
            serve_pending(session, pool, now)
        changed += change is not None
    return changed


# ---- reconciliation --------------------------------------------------------------


def reconcile(factory: sessionmaker[Session], provisioners: ProvisionerSet, now: datetime) -> int:
    """Destroy every resource of this deployment that the database does not hold live.

    The listing is taken before the database is read: a worker row is always
    committed before its resource is created, so anything listed that has no
    unfinished row is an orphan (left by a crash, or by a deleted database).
    """
    with session_scope(factory) as session:
        pools = list(session.exec(select(Pool)).all())
    deployment_id = provisioners.deployment.deployment_id
    orphans = 0
    for provisioner in provisioners.distinct(pools):
        try:
            owned = provisioner.list_owned(deployment_id)
        except Exception as exc:
            metrics.PROVISIONER_ERRORS.labels(
                provisioner.pool, "list_owned", _error_kind(exc)
            ).inc()
            log.warning("list_owned_failed provisioner=%s error=%s", provisioner.name, exc)
            continue
        unknown = _not_live(factory, owned)
        if not unknown:
            continue
        log.warning(
            "orphans_found provisioner=%s count=%d workers=%s",
            provisioner.name,
            len(unknown),
            ",".join(h.worker_id for h in unknown[:20]),
        )
        results = provisioner.destroy_many(unknown)
        for worker_id, error in results.items():
            if error is None:
                orphans += 1
            else:
                metrics.PROVISIONER_ERRORS.labels(
                    provisioner.pool, "destroy", _error_kind(error)
                ).inc()
                log.warning("orphan_destroy_failed worker=%s error=%s", worker_id, error)
    return orphans


def _not_live(factory: sessionmaker[Session], owned: list[WorkerHandle]) -> list[WorkerHandle]:
    if not owned:
        return []
    # Every live id (the state index; cost follows the live workers), not "these ids":
    # an IN list of thousands of listed ids cost far more, on PostgreSQL above all.
    with session_scope(factory) as session:
        live = set(
            session.exec(select(Worker.id).where(col(Worker.state).in_(LIVE_WORKER_STATES))).all()
        )
    return [h for h in owned if h.worker_id not in live]
