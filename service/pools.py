"""Pools: applying the config, refill planning, trimming the warm pool, and per-state counts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from sqlalchemy import (
    String,
    Table,
    bindparam,
    func,
    insert,
    literal,
    literal_column,
    type_coerce,
    union_all,
)
from sqlalchemy import select as core_select
from sqlalchemy.engine import Row
from sqlalchemy.types import NullType
from sqlmodel import Session, col, select

from service.capacity import (
    PROVISION_SAMPLES,
    History,
    Schedule,
    Target,
    WarmPolicy,
    ready_target,
    warm_target,
)
from service.config import PoolConfig
from service.db import core_connection, lock_job, with_row_locks
from service.driver_sql import DriverStatement
from service.errors import InvalidRequest, NotFound
from service.leasing import schedule_destroy
from service.models import (
    LIVE_WORKER_STATES,
    Installation,
    Lease,
    LeaseState,
    Pool,
    Worker,
    WorkerState,
)
from service.security import ACCESS_TOKEN_PREFIX, BOOTSTRAP_TOKEN_PREFIX, new_id, new_token
from service.states import record

if TYPE_CHECKING:  # an annotation only: `simulate` starts without the API models (~0.2 s)
    from service.schemas import PoolPatch

log = logging.getLogger("workerlease.pools")

MAX_BACKOFF_S = 600


def apply_config(session: Session, pools: list[PoolConfig], now: datetime) -> None:
    """Insert new pools, update changed ones, disable pools no longer configured.

    The runtime knobs (``min_ready``, ``max_workers``) keep an operator's PATCH
    unless the config's own value changed since it was last applied.
    """
    configured = {pool.name: pool for pool in pools}
    for stale in session.exec(select(Pool)).all():
        if stale.name not in configured and stale.in_config:
            stale.in_config = False
            stale.enabled = False
            record(
                session, "pool", stale.name, "removed from config: disabled", now, pool=stale.name
            )
    for config in pools:
        row = session.get(Pool, config.name)
        if row is None:
            row = Pool(
                name=config.name,
                min_ready=config.min_ready,
                max_workers=config.max_workers,
                config_min_ready=config.min_ready,
                config_max_workers=config.max_workers,
                os=config.os,
                provisioner="",
                lease_idle_timeout_s=0,
                lease_max_lifetime_s=0,
                provision_timeout_s=0,
                pending_timeout_s=0,
            )
            record(session, "pool", config.name, "created from config", now, pool=config.name)
        _apply_pool_config(row, config)
        session.add(row)


def _apply_pool_config(row: Pool, config: PoolConfig) -> None:
    if row.config_min_ready != config.min_ready:
        row.min_ready = row.config_min_ready = config.min_ready
    if row.config_max_workers != config.max_workers:
        row.max_workers = row.config_max_workers = config.max_workers
    if not row.in_config:
        row.enabled = True
    row.in_config = True
    row.os = config.os
    row.description = config.description
    row.provisioner = config.provisioner
    row.options = dict(config.options)
    row.capabilities = list(config.capabilities)
    row.max_concurrent_tasks = config.max_concurrent_tasks
    row.lease_idle_timeout_s = config.lease_idle_timeout
    row.lease_max_lifetime_s = config.lease_max_lifetime
    row.provision_timeout_s = config.provision_timeout
    row.pending_timeout_s = config.pending_timeout
    row.warm_policy = config.warm_policy
    row.warm_hit_target = config.warm_hit_target
    row.scale_down_delay_s = config.scale_down_delay
    row.demand_half_life_s = config.demand_half_life
    row.schedules = [schedule.model_dump() for schedule in config.schedules]


_POOL_NAMED = select(Pool).where(Pool.name == bindparam("name"))


def pool_named(session: Session, name: str) -> Pool | None:
    """``session.get(Pool, name)`` for the hot paths (the ready callback, the replay's trim
    check): ``get`` builds its statement and cache key anew on each call, which cost as
    much as the read itself on SQLite; this statement is built once."""
    return session.exec(_POOL_NAMED, params={"name": name}).first()


def patch_pool(session: Session, name: str, patch: PoolPatch, now: datetime) -> Pool:
    pool = session.get(Pool, name)
    if pool is None:
        raise NotFound(f"no pool named {name!r}")
    min_ready = pool.min_ready if patch.min_ready is None else patch.min_ready
    max_workers = pool.max_workers if patch.max_workers is None else patch.max_workers
    if min_ready > max_workers:
        raise InvalidRequest(f"min_ready ({min_ready}) must not exceed max_workers ({max_workers})")
    if patch.enabled and not pool.in_config:
        raise InvalidRequest(f"pool {name!r} is not in the config any more; add it there first")
    pool.min_ready, pool.max_workers = min_ready, max_workers
    if patch.enabled is not None:
        pool.enabled = patch.enabled
    session.add(pool)
    record(session, "pool", name, f"patched: {patch.model_dump(exclude_none=True)}", now, pool=name)
    return pool


# ---- counting -------------------------------------------------------------------


@dataclass
class PoolCounts:
    by_state: dict[str, int]
    pending_leases: int

    @property
    def not_destroyed(self) -> int:
        return sum(n for state, n in self.by_state.items() if state != WorkerState.DESTROYED)

    def __getitem__(self, state: WorkerState) -> int:
        return self.by_state.get(state, 0)


# Every pass counts (~3 a request in the replay), so the statement runs on the driver's
# cursor (``DriverStatement``): building it took about as long as running it on SQLite,
# and SQLAlchemy's execution as long again. One statement for both counts: a second one
# cost as much again.
_PENDING_LEASES = "leases:pending"  # in the state column of the pending leases' counts
_COUNTS_BY_POOL = DriverStatement(
    union_all(
        select(Worker.pool, Worker.state, func.count().label("n"))
        # IN, not "!= destroyed": the (state, pool) index then skips all of history. Literals:
        # a bound list is expanded into the SQL again at every execution.
        .where(
            col(Worker.state).in_([literal_column(f"'{state}'") for state in LIVE_WORKER_STATES])
        )
        .group_by(col(Worker.pool), col(Worker.state)),
        select(Lease.pool, literal(_PENDING_LEASES, String), func.count().label("n"))
        .where(Lease.state == LeaseState.PENDING.value)
        .group_by(col(Lease.pool)),
    )
)


def counts_by_pool(session: Session) -> dict[str, PoolCounts]:
    """Unfinished workers per pool and state, and pending leases per pool (partial indexes)."""
    counts: dict[str, PoolCounts] = {}
    for pool, state, n in _COUNTS_BY_POOL.all(core_connection(session), {}):
        pool_counts = counts.setdefault(pool, PoolCounts({}, 0))
        if state == _PENDING_LEASES:
            pool_counts.pending_leases = n
        else:
            pool_counts.by_state[state] = n
    return counts


# ---- the warm target ---------------------------------------------------------------

# Bounds on what one pool's history read returns, whatever the traffic.
MAX_REQUESTS_READ = 20_000


class PoolView(Protocol):
    """What the passes read of a pool: its ORM row, or a plain row of its columns
    (``pools_by_name``, whose ORM load was ~14 % of the replay)."""

    name: str
    os: str
    provisioner: str
    options: dict[str, Any]
    capabilities: list[str]
    enabled: bool
    create_backoff_until: datetime | None
    min_ready: int
    max_workers: int
    warm_policy: str
    warm_hit_target: float
    scale_down_delay_s: int
    demand_half_life_s: int
    schedules: list[dict[str, Any]]
    provision_timeout_s: int
    warning: str | None


# A pool's ORM row or plain row, or a Core row with the columns a caller reads of it
# (``_WARM_POLICY``).
PoolSettings = Pool | Row[*tuple[Any, ...]] | PoolView


def warm_policy(pool: PoolSettings) -> WarmPolicy:
    """The pool's warm policy, from its ORM row or a row of ``_WARM_POLICY``'s columns."""
    return WarmPolicy(
        policy=pool.warm_policy,
        min_ready=pool.min_ready,
        max_workers=pool.max_workers,
        hit_target=pool.warm_hit_target,
        scale_down_delay_s=pool.scale_down_delay_s,
        demand_half_life_s=pool.demand_half_life_s,
        schedules=tuple(
            Schedule(s["cron"], s["duration"], s["min_ready"], s.get("timezone", "UTC"))
            for s in pool.schedules
        ),
        os=pool.os,
    )


_POOLS: Table = Pool.__table__  # type: ignore[attr-defined]
# As the driver returns it, for the driver statements: SQLAlchemy's PostgreSQL float type
# builds its result processor from the cursor's type code, which a statement compiled
# ahead does not have. Both drivers return a float for the column (REAL, double
# precision), as the type's processor would.
HIT_TARGET = type_coerce(_POOLS.c.warm_hit_target, NullType()).label("warm_hit_target")
# The replay's trim check after each ready callback reads only these: in Core, as an ORM
# load of the pool's row cost more than the rest of the check's statements.
_WARM_POLICY_COLUMNS = (
    _POOLS.c.enabled,
    _POOLS.c.warm_policy,
    _POOLS.c.min_ready,
    _POOLS.c.max_workers,
    HIT_TARGET,
    _POOLS.c.scale_down_delay_s,
    _POOLS.c.demand_half_life_s,
    _POOLS.c.schedules,
    _POOLS.c.os,
)
_WARM_POLICY = DriverStatement(
    core_select(*_WARM_POLICY_COLUMNS).where(_POOLS.c.name == bindparam("name"))
)


# Every pass reads them: plain rows of every column on the driver's cursor
# (``DriverStatement``), not ORM objects (the ORM's load was ~14 % of the replay's
# profile). Nothing writes through them: a pass that changes a pool loads its ORM row.
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


def enabled_warm_policy(session: Session, name: str) -> WarmPolicy | None:
    """The pool's warm policy; None when there is no such pool or it is disabled."""
    row = _WARM_POLICY.first(core_connection(session), {"name": name})
    return warm_policy(row) if row is not None and row.enabled else None


class HistoryMemo:
    """A pool's history rows, kept and brought up to date when the owner says rows were added.

    For a single-threaded replay only (``workerlease simulate``): a lease request adds
    a request time, an agent's ready callback a provisioning time, and nothing else adds
    to either (a simulated worker becomes ready by its callback only), so between those
    events every pass reads the same rows (a rung demand pass, ``due.next_due`` and the
    destroy pass's check, at later virtual instants too). The replay tells it each
    request (``requests_added(pool, at)``, the new lease's ``created_at``) and each
    provisioning time (``provisioning_added``, from the ready callback): the newest,
    virtual time only moves on. It adds them to what it holds without a read (reading
    again the rows at the newest instant was most of the two reads' cost). Two workers
    ready at one instant make it read again: the rows at or after the newest it holds,
    its own at that instant dropped. Request times are kept, not ages: a later read
    takes those at or after its own ``since``, which is what the database would return
    (nothing is inserted before ``now``).
    The service never sets one: its passes run beside requests in other threads.
    """

    def __init__(self) -> None:
        self._requests: dict[str, tuple[datetime, list[datetime]]] = {}  # since, newest first
        self._provisioning: dict[str, tuple[list[datetime], list[float]]] = {}  # ready_at, s
        self._new_provisioning: set[str] = set()

    def requests_since(self, session: Session, pool: str, since: datetime) -> list[datetime]:
        read = self._requests.get(pool)
        if read is None or read[0] > since:
            read = (since, _requests_since(session, pool, since))
        times = read[1]
        while times and times[-1] < since:  # before this read's window, and so any later one's
            times.pop()
        self._requests[pool] = (since, times)
        return times

    def provisioned(self, session: Session, pool: str) -> list[float]:
        read = self._provisioning.get(pool)
        if read is None or pool in self._new_provisioning:
            held = list(zip(*read, strict=True)) if read is not None else []
            since = held[0][0] if held else _EPOCH
            fresh = _PROVISIONED_SINCE.all(core_connection(session), {"pool": pool, "since": since})
            rows = [(ready, (ready - created).total_seconds()) for created, ready in fresh]
            rows += [(ready, seconds) for ready, seconds in held if ready < since]
            rows = rows[:PROVISION_SAMPLES]
            read = self._provisioning[pool] = ([r for r, _ in rows], [s for _, s in rows])
            self._new_provisioning.discard(pool)
        return read[1]

    def requests_added(self, pool: str, at: datetime) -> None:
        """A lease request of ``pool`` at ``at``, at or after every one before it."""
        read = self._requests.get(pool)
        if read is not None:
            times = read[1]
            assert not times or at >= times[0], "requests are told in time order"
            times.insert(0, at)
            del times[MAX_REQUESTS_READ:]

    def provisioning_added(self, pool: str, ready_at: datetime, seconds: float) -> None:
        """A worker of ``pool`` became ready at ``ready_at``, ``seconds`` after its creation
        (its row's ``ready_at - created_at``), at or after every one before it. At the
        instant of the newest held, the database's order among equal times decides what
        the sample cap keeps: the next read asks it."""
        read = self._provisioning.get(pool)
        if read is None:
            return
        ready, samples = read
        if ready and ready_at <= ready[0]:
            self._new_provisioning.add(pool)
            return
        self._provisioning[pool] = (
            [ready_at, *ready][:PROVISION_SAMPLES],
            [seconds, *samples][:PROVISION_SAMPLES],
        )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


HISTORY_MEMO: ContextVar[HistoryMemo | None] = ContextVar("workerlease_history_memo", default=None)


def pool_history(session: Session, pool: str, since: datetime, now: datetime) -> History:
    """The pool's lease requests since ``since`` and its last provisioning times (two
    range reads of ``ix_leases_pool_created`` and ``ix_workers_pool_ready``)."""
    memo = HISTORY_MEMO.get()
    if memo is None:
        requested, provision_s = _requests_since(session, pool, since), _provisioned(session, pool)
    else:
        requested = memo.requests_since(session, pool, since)
        provision_s = memo.provisioned(session, pool)
    return History(
        request_ages_s=[(now - at).total_seconds() for at in requested if at >= since],
        provision_s=provision_s,
    )


# On the driver's cursor (``DriverStatement``): every pass that sizes a pool reads them
# (the replay once per request and per ready callback, ``HistoryMemo``).
_LAST_PROVISIONED_ALL = (
    select(Worker.created_at, Worker.ready_at)
    .where(Worker.pool == bindparam("pool"), col(Worker.ready_at).is_not(None))
    .order_by(col(Worker.ready_at).desc())
    .limit(PROVISION_SAMPLES)
)
_REQUESTS_SINCE = DriverStatement(
    select(Lease.created_at)
    .where(Lease.pool == bindparam("pool"), col(Lease.created_at) >= bindparam("since"))
    .order_by(col(Lease.created_at).desc())
    .limit(MAX_REQUESTS_READ)
)
_LAST_PROVISIONED = DriverStatement(_LAST_PROVISIONED_ALL)
_PROVISIONED_SINCE = DriverStatement(
    _LAST_PROVISIONED_ALL.where(col(Worker.ready_at) >= bindparam("since"))
)


def _requests_since(session: Session, pool: str, since: datetime) -> list[datetime]:
    """Newest first, at most ``MAX_REQUESTS_READ``."""
    params = {"pool": pool, "since": since}
    return [at for (at,) in _REQUESTS_SINCE.all(core_connection(session), params)]


def _provisioned(session: Session, pool: str) -> list[float]:
    rows = _LAST_PROVISIONED.all(core_connection(session), {"pool": pool})
    return [(ready - created).total_seconds() for created, ready in rows if ready]


def warm_targets(
    session: Session, pools: Sequence[PoolSettings], now: datetime
) -> dict[str, Target]:
    """Each pool's ready target and what trim keeps, with why (service.capacity)."""
    return {pool.name: warm_target(*_policy_history(session, pool, now), now) for pool in pools}


def ready_targets(session: Session, pools: Sequence[PoolSettings], now: datetime) -> dict[str, int]:
    """Each pool's ready target alone (``warm_targets``' ``ready``): what refill fills to."""
    return {pool.name: ready_target(*_policy_history(session, pool, now), now) for pool in pools}


def _policy_history(
    session: Session, pool: PoolSettings, now: datetime
) -> tuple[WarmPolicy, History]:
    """The pool's warm policy and the history it reads (none for a fixed one)."""
    policy = warm_policy(pool)
    if not policy.reads_history:
        return policy, History()
    since = now - timedelta(seconds=policy.history_s)
    return policy, pool_history(session, pool.name, since, now)


# ---- refill and trim ------------------------------------------------------------


def workers_wanted(pool: PoolSettings, counts: PoolCounts, target: int | None = None) -> int:
    """How many new workers to start: ready + provisioning >= target + pending, capped.

    ``target`` is the pool's ready target (``warm_targets``); ``min_ready`` by default.
    """
    supply = counts[WorkerState.READY] + counts[WorkerState.PROVISIONING]
    demand = (pool.min_ready if target is None else target) + counts.pending_leases
    room = pool.max_workers - counts.not_destroyed
    return max(0, min(demand - supply, room))


def demand_outruns_supply(session: Session) -> bool:
    """True when some enabled pool has pending leases and room for workers it lacks."""
    counts = counts_by_pool(session)
    if not any(c.pending_leases for c in counts.values()):
        return False
    pools = {p.name: p for p in session.exec(select(Pool)).all()}
    return any(
        pools[name].enabled and c.pending_leases > 0 and workers_wanted(pools[name], c) > 0
        for name, c in counts.items()
        if name in pools
    )


# Built once, as the counts; in Core with the columns the check reads: an ORM load of
# the pool rows cost twice these (simulate's replay asks after every destroy pass).
_ENABLED_POOLS = DriverStatement(
    core_select(_POOLS.c.name, _POOLS.c.create_backoff_until, *_WARM_POLICY_COLUMNS).where(
        _POOLS.c.enabled.is_(True)
    )
)


def refill_wanted(session: Session, now: datetime) -> bool:
    """True when some enabled pool, not backing off, lacks workers: pending leases or
    fewer ready (and on their way) than its target. What a rung doorbell checks."""
    counts = counts_by_pool(session)
    pools = [
        pool
        for pool in _ENABLED_POOLS.all(core_connection(session), {})
        if pool.create_backoff_until is None or pool.create_backoff_until <= now
    ]
    targets = ready_targets(session, pools, now)
    return any(
        workers_wanted(pool, counts.get(pool.name, PoolCounts({}, 0)), targets[pool.name]) > 0
        for pool in pools
    )


def plan_refill(
    session: Session, now: datetime, every_pool: Sequence[PoolView] | None = None
) -> list[PlannedWorker]:
    """Commit-ready rows (state provisioning) for every worker the pools lack.

    The rows are committed before any provisioner is asked to create anything,
    so a crash never leaves a resource the database does not know about.
    ``every_pool``: the pools as this transaction read them (else they are read here).
    """
    lock_job(session, "refill")  # two replicas must not both fill the same gap
    counts = counts_by_pool(session)
    rows: list[dict[str, Any]] = []
    if every_pool is None:
        every_pool = session.exec(select(Pool)).all()
    pools = [
        pool
        for pool in every_pool
        if pool.enabled and (pool.create_backoff_until is None or pool.create_backoff_until <= now)
    ]
    targets = ready_targets(session, pools, now)
    for pool in pools:
        target = targets[pool.name]
        wanted = workers_wanted(pool, counts.get(pool.name, PoolCounts({}, 0)), target)
        for _ in range(wanted):
            row = new_worker_row(pool.name, now)
            record(session, "worker", row["id"], "provisioning: pool refill", now, pool=pool.name)
            rows.append(row)
    if rows:  # one executemany on the driver's cursor, not the ORM's flush of new objects
        _INSERT_WORKERS.run_many(core_connection(session), rows)
    return [PlannedWorker(*(row[name] for name in PlannedWorker._fields)) for row in rows]


class PlannedWorker(NamedTuple):
    """A worker ``plan_refill`` added, with what its callers read of the row."""

    id: str
    pool: str
    state: str
    bootstrap_token: str
    access_token: str


# The planned rows as plain rows on the driver's cursor (``DriverStatement``): building
# an ORM ``Worker`` for each only to dump it into the ``INSERT`` cost as much as the
# rest of the plan (simulate's profile: ~7 % of the replay with the ``INSERT`` through
# SQLAlchemy). Every column is given, as the ORM's dump gave them.
_WORKERS: Table = Worker.__table__  # type: ignore[attr-defined]
_INSERT_WORKERS = DriverStatement(
    insert(_WORKERS).values({column.key: bindparam(column.key) for column in _WORKERS.c})
)


def new_worker_row(pool_name: str, now: datetime) -> dict[str, Any]:
    """Every column of a new worker's row (state provisioning, fresh tokens)."""
    return {
        "id": new_id("w"),
        "pool": pool_name,
        "state": WorkerState.PROVISIONING.value,
        "created_at": now,
        "state_changed_at": now,
        "ready_at": None,
        "provider_id": None,
        "address": None,
        "agent_url": None,
        "bootstrap_token": new_token(BOOTSTRAP_TOKEN_PREFIX),
        "access_token": new_token(ACCESS_TOKEN_PREFIX),
        "worker_token_hash": None,
        "create_attempts": 0,
        "destroy_attempts": 0,
        "next_attempt_at": None,
        "claimed_until": None,
        "last_error": None,
    }


def new_worker(pool_name: str, now: datetime) -> Worker:
    return Worker(**new_worker_row(pool_name, now))


def trim(session: Session, now: datetime) -> int:
    """Destroy ready workers beyond what the pool keeps plus pending leases (after a
    lowered ``min_ready``; after ``scale_down_delay`` when demand or a schedule fell)."""
    counts = counts_by_pool(session)
    trimmed = 0
    pools = pools_by_name(session)
    targets = warm_targets(session, [pool for pool in pools if pool.enabled], now)
    for pool in pools:
        pool_counts = counts.get(pool.name, PoolCounts({}, 0))
        keep = (targets[pool.name].keep + pool_counts.pending_leases) if pool.enabled else 0
        surplus = pool_counts[WorkerState.READY] - keep
        if surplus <= 0:
            continue
        newest_first = (
            select(Worker)
            .where(Worker.pool == pool.name, Worker.state == WorkerState.READY)
            .order_by(col(Worker.ready_at).desc())
            .limit(surplus)
        )
        for worker in session.exec(with_row_locks(newest_first, session)).all():
            schedule_destroy(session, worker, "surplus ready worker", now)
            trimmed += 1
    return trimmed


def note_create_result(pool: Pool, error: str | None, now: datetime) -> None:
    """Back off a pool whose creates fail; a success clears the mark those failures set.

    A mark set by a worker that never called back (:func:`note_callback_timeout`,
    ``create_failures`` 0) stays: a create that succeeds says nothing about callbacks.
    """
    if error is None:
        if pool.create_failures:
            pool.degraded_reason = None
        pool.create_failures = 0
        pool.create_backoff_until = None
        return
    pool.create_failures += 1
    delay = min(MAX_BACKOFF_S, 5 * 2 ** min(pool.create_failures - 1, 10))
    pool.create_backoff_until = now + timedelta(seconds=delay)
    pool.degraded_reason = error[:500]


def note_callback_timeout(session: Session, pool: Pool, worker_id: str, now: datetime) -> str:
    """A worker of the pool never called back: the pool is degraded, with the likely cause."""
    reason = (
        f"worker {worker_id} did not call back within {_duration(pool.provision_timeout_s)}: "
        "check that workers can reach the service (public_url, or serve --host/--port "
        "when it is unset)"
    )
    if pool.degraded_reason is None:
        record(session, "pool", pool.name, f"degraded: {reason}", now, pool=pool.name)
    pool.degraded_reason = reason
    session.add(pool)
    return reason


def note_callback(session: Session, pool: Pool, now: datetime) -> None:
    """A worker called back: a mark set by callback timeouts goes."""
    if pool.degraded_reason is not None and not pool.create_failures:
        pool.degraded_reason = None
        session.add(pool)
        record(session, "pool", pool.name, "workers call back again", now, pool=pool.name)


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def installation_id(session: Session) -> str:
    """The id of this database (``workerlease.installation`` on every resource it made)."""
    return session.exec(select(Installation.id)).one()


def record_warnings(session: Session, warnings: dict[str, str | None], now: datetime) -> None:
    """Keep each pool's provisioner warning; a change is logged and audited.

    Compared on the plain rows; a pool's ORM row is loaded only to change it (every
    full pass asks, and a warning nearly never changes)."""
    for seen in pools_by_name(session):
        warning = warnings.get(seen.name, seen.warning)
        if seen.warning == warning:
            continue
        pool = pool_named(session, seen.name)
        if pool is None:
            continue
        pool.warning = warning
        session.add(pool)
        record(session, "pool", pool.name, f"warning: {warning or 'cleared'}", now, pool=pool.name)
        if warning:
            log.warning("pool_warning pool=%s warning=%s", pool.name, warning)
