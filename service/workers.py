"""Workers: the agent's ready callback, claims, recorded results, timeouts and health.

Every function here runs inside the caller's transaction (``session``) and takes
``now`` from the caller's clock; none calls a provisioner. The passes that do
(``service.passes``) claim work here (``claimed_until`` under a row lock), call
the provisioner outside any transaction, then record what happened here in a new
short transaction. So several replicas can run the same pass at once, and a
crash at any point leaves rows a later pass picks up again.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Table, bindparam, func, literal_column, update
from sqlalchemy import select as core_select
from sqlalchemy.engine import Connection
from sqlmodel import Session, col, select

from service import metrics
from service.db import Prepared, core_connection, is_sqlite, transaction_connection, with_row_locks
from service.driver_sql import DriverStatement
from service.errors import Conflict, NotFound, Unauthorized
from service.leasing import (
    end_lease,
    revoke_lease,
    schedule_destroy,
    serve_pending,
    serve_pending_of,
)
from service.models import (
    LIVE_LEASE_STATES,
    LIVE_WORKER_STATES,
    EndReason,
    Lease,
    LeaseState,
    Pool,
    Worker,
    WorkerState,
)
from service.pools import note_callback, note_callback_timeout, note_create_result, pool_named
from service.security import WORKER_TOKEN_PREFIX, hash_token, new_token, secret_equals
from service.states import move_worker, moved, record

log = logging.getLogger("workerlease.workers")

# A claim outlives the slowest provisioner call (EC2 creates may wait on the rate limiter);
# after a crash the claimed rows are picked up again once it lapses.
CLAIM_FOR = timedelta(seconds=90)
MAX_DESTROY_BACKOFF_S = 600


@dataclass(frozen=True)
class CallFailure:
    """A provisioner call that failed, as recorded here (the passes translate exceptions)."""

    kind: str  # the provisioner's error class: the metric label, so causes stay distinct
    detail: str
    permanent: bool  # retrying cannot help until an operator changes something


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


# One answer for an unknown worker and a wrong token: no oracle of which ids exist.
BAD_BOOTSTRAP = "unknown worker, or an invalid or already used bootstrap token"


_WORKERS: Table = Worker.__table__  # type: ignore[attr-defined]
_POOLS: Table = Pool.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Ready:
    """What the ready callback gives the agent, and the leases it activated."""

    worker_id: str
    access_token: str  # for the agent; shown to tenants only through their active lease
    worker_token: str  # shown once: only its hash is kept
    activated: list[Lease]
    provisioned_s: float  # created -> ready, as ``workerlease_provisioning_seconds`` saw it


# The ready callback in Core: every worker calls it once, and the ORM's load of the
# worker and pool rows and its flush cost more than the statements (simulate's profile,
# docs/capacity.md). One SELECT reads the worker and what the callback needs of its
# pool, locking the worker's row only (``OF``: callbacks of one pool do not queue on
# the pool's row); one UPDATE moves it, held at ``provisioning`` by its WHERE.
def _ready_look(*, lock: bool) -> Any:
    look = (
        core_select(
            _WORKERS.c.pool,
            _WORKERS.c.state,
            _WORKERS.c.bootstrap_token,
            _WORKERS.c.access_token,
            _WORKERS.c.address,
            _WORKERS.c.created_at,
            _POOLS.c.enabled,
            _POOLS.c.degraded_reason,
            _POOLS.c.create_failures,
        )
        .select_from(_WORKERS.outerjoin(_POOLS, _POOLS.c.name == _WORKERS.c.pool))
        .where(_WORKERS.c.id == bindparam("worker_id"))
    )
    return look.with_for_update(of=_WORKERS) if lock else look


# On the driver's cursor (``driver_sql.DriverStatement``): each worker calls back once.
_READY_LOOK = DriverStatement(_ready_look(lock=False))
_READY_LOOK_LOCKED = DriverStatement(_ready_look(lock=True))
_MARK_READY = DriverStatement(
    update(_WORKERS)
    .where(
        _WORKERS.c.id == bindparam("worker_id"),
        _WORKERS.c.state == WorkerState.PROVISIONING.value,
    )
    .values(
        state=WorkerState.READY.value,
        state_changed_at=bindparam("now"),
        ready_at=bindparam("now"),
        agent_url=bindparam("agent_url"),
        address=bindparam("address"),
        bootstrap_token=None,
        worker_token_hash=bindparam("token_hash"),
    )
)


def check_bootstrap_token(session: Session, worker_id: str, bootstrap_token: str) -> Any:
    """The worker whose one-time bootstrap token this is (and its pool's marks), its row
    locked; else Unauthorized. Read in Core: no ORM object of the worker is left in the
    session for the ready callback's UPDATE to make stale."""
    look = _READY_LOOK if is_sqlite(session) else _READY_LOOK_LOCKED
    row = look.first(core_connection(session), {"worker_id": worker_id})
    stored = row.bootstrap_token if row is not None else None
    # Compared even when there is nothing to compare with, so both cases take as long.
    matches = secret_equals(bootstrap_token, stored or "wlb_" + "-" * 43)
    if row is None or stored is None or not matches:
        if row is not None and stored is None and row.state in _TOKEN_LIVE_STATES:
            _note_ready_again(worker_id, row.state)
        raise Unauthorized(BAD_BOOTSTRAP)
    return row


def _note_ready_again(worker_id: str, state: str) -> None:
    """A ready call for a worker its first ready call already made ready. The answer stays
    the same 401 (no oracle), but an operator learns why such a worker may fail soon:
    its agent did not get the first answer (it gave up waiting, or the connection
    broke) and, refused now, exits."""
    log.warning(
        "ready_callback_repeated worker=%s state=%s: its one-time bootstrap token was "
        "spent by an earlier ready call; an agent that did not receive that answer exits",
        worker_id,
        state,
    )


def worker_ready(
    session: Session,
    worker_id: str,
    bootstrap_token: str,
    agent_url: str,
    address: str | None,
    now: datetime,
) -> Ready:
    """Mark a provisioning worker ready (one-time bootstrap token) and serve waiting leases.

    The agent gets its worker token here: the credential of its task endpoints, which
    no tenant ever holds (tenants see the worker's access token, for ``/run``)."""
    row = check_bootstrap_token(session, worker_id, bootstrap_token)
    if row.state != WorkerState.PROVISIONING:
        raise Conflict(f"worker {worker_id} is {row.state}, not provisioning")
    assert row.enabled is not None  # the worker's pool (a foreign key)
    worker_token = new_token(WORKER_TOKEN_PREFIX)
    params = {
        "worker_id": worker_id,
        "now": now,
        "agent_url": agent_url,
        "address": address or row.address,
        "token_hash": hash_token(worker_token),
    }
    if _MARK_READY.run(transaction_connection(session), params) != 1:
        raise Conflict(f"worker {worker_id} is no longer provisioning")  # not under the lock
    # Loaded earlier in this transaction: read it again if used. Looked for only when the
    # session holds any object (building the key was ~4 % of a replayed ready callback).
    if len(session.identity_map):
        loaded = session.identity_map.get(session.identity_key(Worker, worker_id))
        if loaded is not None:
            session.expire(loaded)
    moved(
        session,
        "worker",
        worker_id,
        WorkerState.PROVISIONING,
        WorkerState.READY,
        "agent reported ready",
        now,
        pool=row.pool,
    )
    provisioned_s = (now - row.created_at).total_seconds()
    metrics.PROVISIONING.labels(row.pool).observe(provisioned_s)
    if row.degraded_reason is not None and not row.create_failures:
        pool = pool_named(session, row.pool)
        assert pool is not None
        note_callback(session, pool, now)
    activated = serve_pending_of(session, row.pool, now) if row.enabled else []
    return Ready(worker_id, row.access_token, worker_token, activated, provisioned_s)


# One answer for an unknown worker, a wrong token and a worker that is gone.
BAD_WORKER_TOKEN = "unknown worker, or an invalid or revoked worker token"
_NO_HASH = "0" * 64


# Core, not the ORM: every agent call runs it (a poll, each chunk of output), and it
# reads two columns of the row.
_WORKER_TOKEN = core_select(_WORKERS.c.worker_token_hash, _WORKERS.c.state).where(
    _WORKERS.c.id == bindparam("worker_id")
)
_TOKEN_LIVE_STATES = frozenset((WorkerState.READY, WorkerState.LEASED))


def check_worker_token(connection: Connection, worker_id: str, token: str) -> None:
    """Unauthorized unless this is the worker token of this worker. The token dies with
    the worker: once it is being destroyed, its agent has nothing more to do."""
    row = connection.execute(_WORKER_TOKEN, {"worker_id": worker_id}).first()
    stored = row.worker_token_hash if row is not None else None
    matches = secret_equals(hash_token(token), stored or _NO_HASH)
    live = row is not None and row.state in _TOKEN_LIVE_STATES
    if stored is None or not matches or not live:
        raise Unauthorized(BAD_WORKER_TOKEN)


def mark_ready(
    session: Session, worker: Worker, agent_url: str | None, address: str | None, now: datetime
) -> None:
    worker.agent_url = agent_url
    worker.address = address or worker.address
    worker.ready_at = now
    worker.bootstrap_token = None
    move_worker(session, worker, WorkerState.READY, "agent reported ready", now)
    metrics.PROVISIONING.labels(worker.pool).observe((now - worker.created_at).total_seconds())
    pool = session.get(Pool, worker.pool)
    if pool is not None:
        note_callback(session, pool, now)


class ClaimedWorker(NamedTuple):
    """A claimed worker, with what its create (the spec's bootstrap token) or its destroy
    (``handle_of``) reads of the row."""

    id: str
    pool: str
    provider_id: str | None
    address: str | None
    bootstrap_token: str | None


# The claims run in every refill and destroy pass: in Core on the driver's cursor
# (``DriverStatement``), the columns their calls read, no ORM object of the worker.
# The statements are the ORM's of before, so SQLite orders ties (workers planned
# together) as it did.
_CLAIMED = (
    _WORKERS.c.id,
    _WORKERS.c.pool,
    _WORKERS.c.provider_id,
    _WORKERS.c.address,
    _WORKERS.c.bootstrap_token,
)
_TO_CREATE_ALL = (
    core_select(*_CLAIMED)
    .where(
        _WORKERS.c.pool == bindparam("pool"),
        _WORKERS.c.state == WorkerState.PROVISIONING.value,
        _WORKERS.c.provider_id.is_(None),
    )
    .where(_WORKERS.c.claimed_until.is_(None) | (_WORKERS.c.claimed_until < bindparam("now")))
    .order_by(_WORKERS.c.created_at)
    .limit(bindparam("limit"))
)
_TO_CREATE = DriverStatement(_TO_CREATE_ALL)
_TO_CREATE_LOCKED = DriverStatement(_TO_CREATE_ALL.with_for_update(skip_locked=True))
# Only with creates in flight here (never in the replay): a bound list is expanded into
# the SQL at each run, which a statement compiled once cannot take.
_TO_CREATE_SKIPPING = Prepared(
    _TO_CREATE_ALL.where(_WORKERS.c.id.not_in(bindparam("skip", expanding=True)))
)
_TO_DESTROY_ALL = (
    core_select(*_CLAIMED)
    .where(
        _WORKERS.c.pool == bindparam("pool"),
        _WORKERS.c.state == WorkerState.DESTROYING.value,
    )
    .where(_WORKERS.c.next_attempt_at.is_(None) | (_WORKERS.c.next_attempt_at <= bindparam("now")))
    .where(_WORKERS.c.claimed_until.is_(None) | (_WORKERS.c.claimed_until < bindparam("now")))
    .order_by(_WORKERS.c.next_attempt_at)
    .limit(bindparam("limit"))
)
_TO_DESTROY = DriverStatement(_TO_DESTROY_ALL)
_TO_DESTROY_LOCKED = DriverStatement(_TO_DESTROY_ALL.with_for_update(skip_locked=True))


def claim_creates(
    session: Session, pool: str, now: datetime, limit: int, skip: Collection[str] = ()
) -> list[ClaimedWorker]:
    """Provisioning rows of the pool whose resource was not requested (or whose claim lapsed).

    ``skip``: worker ids whose create is still running in this process.
    """
    connection = core_connection(session)
    params = {"pool": pool, "now": now, "limit": limit}
    if skip:
        statement = _TO_CREATE_SKIPPING.for_update(session)
        rows = connection.execute(statement, {**params, "skip": list(skip)}).all()
    else:
        rows = (_TO_CREATE if is_sqlite(session) else _TO_CREATE_LOCKED).all(connection, params)
    workers = [ClaimedWorker(*row) for row in rows]
    _claimed(connection, workers, _CLAIM_CREATE, now + CLAIM_FOR)
    return workers


# A claim updates only the rows the SELECT locked (one ``executemany``).
_CLAIM_ONE = (
    update(_WORKERS)
    .where(_WORKERS.c.id == bindparam("b_id"))
    .values(claimed_until=bindparam("until"))
)
_CLAIM = DriverStatement(_CLAIM_ONE)
_CLAIM_CREATE = DriverStatement(_CLAIM_ONE.values(create_attempts=_WORKERS.c.create_attempts + 1))


def _claimed(
    connection: Connection,
    workers: list[ClaimedWorker],
    claim: DriverStatement,
    until: datetime,
) -> None:
    if workers:
        claim.run_many(connection, [{"b_id": w.id, "until": until} for w in workers])


# The create's and the destroy's records in Core, on the driver's cursor: each worker's
# create and destroy records itself, and the ORM loads of the worker and pool rows cost
# more than the UPDATE (simulate's profile). The pool's row is loaded only when it has a
# mark to clear.
_RECORD_CREATE = DriverStatement(
    update(_WORKERS)
    .where(_WORKERS.c.id == bindparam("worker_id"))
    .values(
        provider_id=bindparam("provider_id"),
        # as ``address or given``: a known address is kept
        address=func.coalesce(func.nullif(_WORKERS.c.address, ""), bindparam("address")),
        claimed_until=None,
    )
)
_CREATES_FAILED = DriverStatement(
    core_select(_POOLS.c.name).where(
        _POOLS.c.name == bindparam("pool"),
        (_POOLS.c.create_failures != 0) | _POOLS.c.create_backoff_until.is_not(None),
    )
)


def record_create(
    session: Session,
    pool_name: str,
    worker_id: str,
    provider_id: str,
    address: str | None,
    now: datetime,
) -> None:
    """The provisioner launched the worker's resource: remember where it is."""
    connection = transaction_connection(session)
    values = {"worker_id": worker_id, "provider_id": provider_id, "address": address}
    _RECORD_CREATE.run(connection, values)
    if _CREATES_FAILED.first(connection, {"pool": pool_name}) is None:
        return  # no backoff for a success to clear
    pool = session.get(Pool, pool_name)
    if pool is not None:
        note_create_result(pool, None, now)
        session.add(pool)


def record_create_failure(
    session: Session, pool_name: str, worker_id: str, failure: CallFailure, now: datetime
) -> None:
    """The create failed: the worker fails (and is destroyed), the pool backs off."""
    metrics.PROVISIONER_ERRORS.labels(pool_name, "create", failure.kind).inc()
    row = session.get(Worker, worker_id)
    if row is not None and row.state == WorkerState.PROVISIONING:
        row.last_error = f"create: {failure.detail}"[:1000]
        move_worker(session, row, WorkerState.FAILED, f"create failed ({failure.kind})", now)
        # Destroy too: a half-created resource must not outlive its row.
        schedule_destroy(session, row, "cleanup after failed create", now)
    pool = session.get(Pool, pool_name)
    if pool is not None:
        note_create_result(pool, f"{failure.kind}: {failure.detail}", now)
        session.add(pool)


def claim_destroys(
    session: Session, pool: str, now: datetime, limit: int = 500
) -> list[ClaimedWorker]:
    """Destroying rows of the pool that are due (their backoff over, no live claim)."""
    connection = core_connection(session)
    claim = _TO_DESTROY if is_sqlite(session) else _TO_DESTROY_LOCKED
    workers = [
        ClaimedWorker(*row)
        for row in claim.all(connection, {"pool": pool, "now": now, "limit": limit})
    ]
    _claimed(connection, workers, _CLAIM, now + CLAIM_FOR)
    return workers


def record_destroys(
    session: Session, pool_name: str, results: dict[str, CallFailure | None], now: datetime
) -> int:
    """Record one destroy batch: ``destroyed`` only where the provisioner confirmed.

    A permanent failure is surfaced on the pool (``destroy_error``, shown as degraded)
    and in the audit log; the worker is still retried, slowly, so an operator's fix
    is picked up and no resource is ever given up on. A confirmed destroy in the
    pool clears the mark.
    """
    destroyed = 0
    permanent: CallFailure | None = None
    for worker_id, failure in results.items():
        if failure is None:
            destroyed += _finish_destroy(session, worker_id, now)
            continue
        row = session.get(Worker, worker_id)
        if row is None or row.state != WorkerState.DESTROYING:
            continue
        _retry_destroy_later(session, row, failure, now)
        if failure.permanent:
            permanent = failure
    if permanent is None and not (destroyed and _destroy_error_marked(session, pool_name)):
        return destroyed  # the pool's row has nothing to change
    pool = session.get(Pool, pool_name)
    if pool is not None:
        if permanent is not None:
            pool.destroy_error = f"{permanent.kind}: {permanent.detail}"[:500]
        elif destroyed and pool.destroy_error is not None:
            pool.destroy_error = None
            record(session, "pool", pool_name, "destroys succeed again", now, pool=pool_name)
        session.add(pool)
    return destroyed


_FINISH_DESTROY = DriverStatement(
    update(_WORKERS)
    .where(
        _WORKERS.c.id == bindparam("worker_id"), _WORKERS.c.state == literal_column("'destroying'")
    )
    .values(
        state=WorkerState.DESTROYED.value,
        state_changed_at=bindparam("now"),
        claimed_until=None,
        next_attempt_at=None,
        bootstrap_token=None,
    )
    .returning(_WORKERS.c.pool)
)
_DESTROY_ERROR = DriverStatement(
    core_select(_POOLS.c.name).where(
        _POOLS.c.name == bindparam("pool"), _POOLS.c.destroy_error.is_not(None)
    )
)


def _finish_destroy(session: Session, worker_id: str, now: datetime) -> int:
    """The provisioner confirmed: ``destroying -> destroyed`` (the ``WHERE`` holds the row
    at ``destroying``); 0 when the row is not there or not being destroyed."""
    finished = _FINISH_DESTROY.first(
        transaction_connection(session), {"worker_id": worker_id, "now": now}
    )
    if finished is None:
        return 0
    pool = finished.pool
    reason = "provisioner confirmed"
    moved(
        session,
        "worker",
        worker_id,
        WorkerState.DESTROYING,
        WorkerState.DESTROYED,
        reason,
        now,
        pool=pool,
    )
    log.info("worker_destroyed pool=%s worker=%s", pool, worker_id)
    return 1


def _destroy_error_marked(session: Session, pool_name: str) -> bool:
    return _DESTROY_ERROR.first(transaction_connection(session), {"pool": pool_name}) is not None


def _retry_destroy_later(
    session: Session, worker: Worker, failure: CallFailure, now: datetime
) -> None:
    metrics.PROVISIONER_ERRORS.labels(worker.pool, "destroy", failure.kind).inc()
    worker.destroy_attempts += 1
    delay = destroy_retry_delay(worker.destroy_attempts, failure.permanent)
    log.warning(
        "worker_destroy_failed pool=%s worker=%s attempt=%d kind=%s permanent=%s "
        "retry_in=%.0fs error=%s",
        worker.pool,
        worker.id,
        worker.destroy_attempts,
        failure.kind,
        failure.permanent,
        delay,
        failure.detail,
    )
    if failure.permanent:
        record(
            session,
            "worker",
            worker.id,
            f"destroy failed permanently ({failure.kind}); retrying every "
            f"{MAX_DESTROY_BACKOFF_S // 60} min: {failure.detail}"[:1000],
            now,
            pool=worker.pool,
        )
    worker.next_attempt_at = now + timedelta(seconds=delay)
    worker.claimed_until = None
    worker.last_error = f"destroy: {failure.detail}"[:1000]
    session.add(worker)


def destroy_retry_delay(attempts: int, permanent: bool) -> float:
    """Seconds until the next destroy attempt: exponential, capped, jittered.

    Jitter spreads the retries of a batch that failed together (a daemon restart, a
    throttled API) so they do not all come back in the same second. A permanent error
    waits the longest: only an operator's change can make it succeed.
    """
    ceiling = (
        MAX_DESTROY_BACKOFF_S if permanent else min(MAX_DESTROY_BACKOFF_S, 2 ** min(attempts, 10))
    )
    return ceiling * random.uniform(0.5, 1.0)


def fail_worker(session: Session, worker: Worker, reason: str, now: datetime) -> None:
    """The worker is dead: fail it, fail its lease, and destroy what is left of it."""
    move_worker(session, worker, WorkerState.FAILED, reason, now)
    lease = session.exec(select(Lease).where(Lease.worker_id == worker.id)).first()
    if lease is not None and lease.state == LeaseState.ACTIVE:
        end_lease(session, lease, EndReason.FAILED, f"worker failed: {reason}", now)
    schedule_destroy(session, worker, "cleanup of failed worker", now)


def destroy_by_operator(
    session: Session, worker_id: str, now: datetime
) -> tuple[Worker, str | None]:
    """An operator destroys a worker now: its live lease is revoked, an idle one fails.

    Returns the worker and the id of its lease, if it ever had one.
    """
    worker = session.exec(
        with_row_locks(select(Worker).where(Worker.id == worker_id), session, skip_locked=False)
    ).first()
    if worker is None:
        raise NotFound(f"no worker {worker_id!r}")
    lease = session.exec(select(Lease).where(Lease.worker_id == worker.id)).first()
    if lease is not None and lease.state in LIVE_LEASE_STATES:
        revoke_lease(session, lease.id, now, "worker destroyed by operator")
    elif worker.state in (WorkerState.PROVISIONING, WorkerState.READY):
        fail_worker(session, worker, "destroyed by operator", now)
    return worker, lease.id if lease is not None else None


def provision_timeouts(session: Session, now: datetime, service_url: str | None = None) -> int:
    """Workers not ready within their pool's provision_timeout are destroyed (and replaced).

    Each one marks its pool degraded with the reason, and logs it: the usual cause is
    an agent that cannot reach the service (``public_url``, or ``serve --host/--port``
    when it is unset), and nothing else would tell the operator why leases wait.
    ``service_url``: where the scheduler tells agents to call back, named in the log.
    """
    statement = (
        select(Worker, Pool)
        .join(Pool, col(Pool.name) == col(Worker.pool))
        .where(Worker.state == WorkerState.PROVISIONING)
    )
    expired = [
        (w, pool)
        for w, pool in session.exec(statement).all()
        if w.created_at + timedelta(seconds=pool.provision_timeout_s) <= now
    ]
    for worker, pool in expired:
        locked = session.exec(
            with_row_locks(select(Worker).where(Worker.id == worker.id), session)
        ).first()
        if locked is not None and locked.state == WorkerState.PROVISIONING:
            fail_worker(session, locked, "provision timeout", now)
            reason = note_callback_timeout(session, pool, locked.id, now)
            log.warning(
                "provision_timeout pool=%s worker=%s service_url=%s reason=%r",
                pool.name,
                locked.id,
                service_url or "-",
                reason,
            )
    return len(expired)


# What a provisioner's answer means for a worker: gone while it should exist fails it;
# running is enough to be ready for provisioners whose images carry no agent.
_FAILS_WHEN_GONE = (WorkerState.PROVISIONING, WorkerState.READY, WorkerState.LEASED)


def health_change(
    state: str, gone: bool, running: bool, ready_when_running: bool
) -> WorkerState | None:
    """The move an observation asks of a worker in ``state``: failed, ready, or none."""
    if gone and state in _FAILS_WHEN_GONE:
        return WorkerState.FAILED
    if running and ready_when_running and state == WorkerState.PROVISIONING:
        return WorkerState.READY
    return None


def apply_health(
    session: Session,
    worker_ids: Collection[str],
    gone: Collection[str],
    running: Collection[str],
    ready_when_running: bool,
    now: datetime,
) -> int:
    """Apply what the provisioner saw to these workers; return how many moved.

    Only these rows are locked, in one statement: locking every running worker would
    make concurrent lease requests skip (SKIP LOCKED) healthy ones.
    """
    statement = select(Worker).where(col(Worker.id).in_(list(worker_ids)))
    changed = 0
    for worker in session.exec(with_row_locks(statement, session)).all():
        # Re-checked under the lock: the worker may have moved since it was described.
        change = health_change(
            worker.state, worker.id in gone, worker.id in running, ready_when_running
        )
        if change == WorkerState.FAILED:
            fail_worker(session, worker, "resource gone", now)
        elif change == WorkerState.READY:
            mark_ready(session, worker, None, worker.address, now)
            pool = session.get(Pool, worker.pool)
            assert pool is not None
            serve_pending(session, pool, now)
        changed += change is not None
    return changed


def drain_deployment(session: Session, now: datetime, reason: str) -> tuple[int, int]:
    """End every live lease and send every live worker to ``destroying``, due now.

    For ``workerlease cleanup`` once the service is stopped: returns (leases ended,
    workers to destroy). Active leases are revoked, pending ones fail; workers already
    destroying are due again at once (their backoff is for a running scheduler).
    """
    leases = session.exec(
        with_row_locks(
            select(Lease).where(col(Lease.state).in_(LIVE_LEASE_STATES)), session, skip_locked=False
        )
    ).all()
    for lease in leases:
        ended = EndReason.REVOKED if lease.state == LeaseState.ACTIVE else EndReason.FAILED
        end_lease(session, lease, ended, reason, now)
    workers = session.exec(
        with_row_locks(
            select(Worker).where(col(Worker.state).in_(LIVE_WORKER_STATES)),
            session,
            skip_locked=False,
        )
    ).all()
    for worker in workers:
        if worker.state in (WorkerState.PROVISIONING, WorkerState.READY):
            fail_worker(session, worker, reason, now)
        elif worker.state == WorkerState.FAILED:
            schedule_destroy(session, worker, reason, now)
        else:  # destroying (leased ones went there with their lease)
            worker.next_attempt_at = now
            worker.claimed_until = None
            session.add(worker)
    return len(leases), len(workers)


def live_worker_ids(session: Session) -> set[str]:
    """Every worker id the provisioners should hold (the state index; cost follows the live)."""
    statement = select(Worker.id).where(col(Worker.state).in_(LIVE_WORKER_STATES))
    return set(session.exec(statement).all())
