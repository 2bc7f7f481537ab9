"""``workerlease simulate``: replay a trace of lease requests against the real service code.

The leasing, refill, trim, expiry and destroy code is the service's own
(``leasing.acquire`` / ``release``, ``workers.worker_ready``, the ``maintain``,
``destroy`` and demand passes), on an in-memory SQLite database, with a virtual
clock and a simulated provisioner (``provisioners.simulated``). Nothing sleeps:
the replay jumps from one event to the next.

What the running service does, and how the replay stands in for it:

- a tenant's request: ``acquire`` at the trace's time; a warm take rings the doorbell,
  so the rung demand pass runs ``RING_SETTLE_S`` later; a pending lease is first
  served from the queue, and the demand pass runs at once;
- an agent's ready callback: at the time the simulated provisioner drew for it;
- the tenant releases ``hold_seconds`` after its lease became active;
- the scheduler: the full ``maintain`` pass (expiry, timeouts, trim, refill) runs when
  time gives it work (``service.due.next_due``: a lease's deadline, a provisioning
  timeout, a backoff ending, a schedule edge, what trim keeps falling below the ready
  workers), at the first ``scheduler.interval`` of the service's schedule at or after
  it, rather than every interval: a pass skipped is one that would have found nothing
  to do. The replay asks again after each pass and each worker that becomes ready
  (the only event that can bring a trim sooner), and once more when the planned tick
  comes: a deadline met meanwhile (a worker ready before its provisioning timeout)
  leaves nothing due, and the tick then runs no pass. The demand pass runs on each ring;
  when leases are pending, the ``destroy`` pass at the next ``scheduler.interval``
  after a release, followed by the demand poll (the room a released worker frees
  refills at once); otherwise destroys run every ``DESTROY_PASS_S``;
- a pool's request and provisioning times are read once, then told to
  ``pools.HistoryMemo`` by the events that add to them (a request, a ready callback);
- its in-memory database goes without the indexes only the HTTP listings read
  (``models.LISTING_INDEXES``); the unique ones, the invariants, stay.

Results are read back from the database: lease waits (request to active), warm hits
(active at once), worker-minutes (created to the decision to destroy it), idle
worker-minutes (ready and not leased), creations, and cost when the pool has
``cost_per_hour``.
"""

from __future__ import annotations

import csv
import heapq
import logging
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import case, func
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from service import leasing, tenants
from service.capacity import ADAPTIVE, FIXED
from service.clock import VirtualClock
from service.config import Config
from service.db import MEMORY_URL, close_held, core_connection, session_scope
from service.driver_sql import DriverStatement
from service.due import next_due, next_trim_due
from service.errors import Conflict, NotFound
from service.leasing import Outcome
from service.models import LISTING_INDEXES, Event, Lease, LeaseState, Worker
from service.passes.destroy import destroy
from service.passes.maintain import answer_demand, maintain
from service.passes.simulation import simulated_cloud, simulation_runtime
from service.pools import HISTORY_MEMO, HistoryMemo, enabled_warm_policy, refill_wanted
from service.scheduler import RING_SETTLE_S
from service.startup import prepare_database
from service.workers import worker_ready

TRACE_HEADER = ["time", "tenant", "pool", "hold_seconds"]
# A Monday, so business-day traces and weekday schedules line up.
DEFAULT_START = datetime(2026, 1, 5, 0, 0, tzinfo=UTC)
# Destroys that nothing waits for run in batches this far apart (their time does not
# count: worker-minutes end at the decision to destroy).
DESTROY_PASS_S = 60.0
# The scheduler runs this long before the trace starts, so a pool starts as its policy
# keeps it (warm with min_ready, say); figures count from the trace's start only.
WARM_UP_S = 3600.0
# After the last request, how long the replay may run for its leases to end.
DRAIN_LIMIT_S = 7 * 24 * 3600.0
# What a simulated agent reports as its URL.
_AGENT_URL = "http://simulated.invalid/"
# Counted after each full pass: past the last request, the replay ends when none is left.
_OPEN_LEASES = DriverStatement(
    select(func.count().label("n"))
    .select_from(Lease)
    .where(col(Lease.state).in_([LeaseState.PENDING.value, LeaseState.ACTIVE.value]))
)


def _without_listing_indexes(engine: Engine) -> Engine:
    """The replay's database without the indexes only the HTTP listings read
    (``models.LISTING_INDEXES``): the figures are the same, each write cheaper. Every
    unique index, which holds an invariant, stays."""
    with engine.begin() as connection:
        for name in LISTING_INDEXES:
            connection.exec_driver_sql(f"DROP INDEX {name}")
    return engine


class SimulationError(ValueError):
    """The trace or the policy cannot be replayed; the message says why."""


@dataclass(frozen=True)
class TraceRow:
    time: float
    tenant: str
    pool: str
    hold_seconds: float


# ---- traces ------------------------------------------------------------------------


def read_trace(path: str | Path) -> list[TraceRow]:
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != TRACE_HEADER:
            raise SimulationError(f"{path}: the header must be {','.join(TRACE_HEADER)}")
        rows = []
        for number, fields in enumerate(reader, start=2):
            try:
                time_s, tenant, pool, hold = fields
                row = TraceRow(float(time_s), tenant, pool, float(hold))
            except ValueError:
                raise SimulationError(
                    f"{path}:{number}: expected time,tenant,pool,hold_seconds"
                ) from None
            if row.time < 0 or row.hold_seconds < 0 or not tenant or not pool:
                raise SimulationError(f"{path}:{number}: negative time or hold, or empty name")
            rows.append(row)
    return sorted(rows, key=lambda r: r.time)


def write_trace(rows: Iterable[TraceRow], path: str | Path) -> int:
    count = 0
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(TRACE_HEADER)
        for row in rows:
            writer.writerow([f"{row.time:.3f}", row.tenant, row.pool, f"{row.hold_seconds:.1f}"])
            count += 1
    return count


SHAPES = ("steady", "business-day", "bursty")


def generate(
    shape: str,
    seed: int,
    pool: str,
    rate_per_min: float = 1.0,
    hours: float = 24.0,
    hold_median_s: float = 600.0,
) -> list[TraceRow]:
    """A synthetic trace: Poisson arrivals whose rate follows the shape (by thinning).

    - steady: ``rate_per_min`` all the time;
    - business-day: from Monday 00:00, weekdays 08:00-18:00 at ``rate_per_min`` (ramping
      up over the first hour), 5 % of it at night and at weekends;
    - bursty: 20 % of it, plus bursts of 10 minutes at 5x about once an hour.
    Holds are lognormal around ``hold_median_s``; every request is a tenant of its own.
    """
    if shape not in SHAPES:
        raise SimulationError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    rng = random.Random(seed)
    peak = rate_per_min / 60.0
    bursts = _burst_windows(rng, hours) if shape == "bursty" else []
    ceiling = peak * (5 if shape == "bursty" else 1)
    rows: list[TraceRow] = []
    t = 0.0
    while True:
        t += rng.expovariate(ceiling)
        if t >= hours * 3600:
            return rows
        if rng.random() * ceiling <= _rate(shape, t, peak, bursts):
            hold = hold_median_s * math.exp(0.8 * rng.gauss(0.0, 1.0))
            rows.append(TraceRow(round(t, 3), f"t{len(rows)}", pool, round(hold, 1)))


def _burst_windows(rng: random.Random, hours: float) -> list[tuple[float, float]]:
    windows, t = [], 0.0
    while t < hours * 3600:
        t += rng.expovariate(1 / 3600)
        windows.append((t, t + 600))
    return windows


def _rate(shape: str, t: float, peak: float, bursts: Sequence[tuple[float, float]]) -> float:
    if shape == "steady":
        return peak
    if shape == "bursty":
        return peak * (5 if any(a <= t < b for a, b in bursts) else 0.2)
    day, hour = divmod(t / 3600, 24)
    if day % 7 >= 5 or not 8 <= hour < 18:
        return peak * 0.05
    return peak * max(0.05, min(1.0, hour - 8))


# ---- policies ----------------------------------------------------------------------


def with_policy(config: Config, policy: str) -> Config:
    """``config`` as is, ``adaptive`` for every pool, or ``fixed:N`` (N ready, no schedules)."""
    if policy == "config":
        return config
    pools = []
    for pool in config.pools:
        if policy == ADAPTIVE:
            pools.append(pool.model_copy(update={"warm_policy": ADAPTIVE}))
            continue
        kind, _, count = policy.partition(":")
        if kind != FIXED or not count.isdigit():
            raise SimulationError(f"unknown policy {policy!r}; use fixed:N, adaptive or config")
        ready = min(int(count), pool.max_workers)
        pools.append(
            pool.model_copy(update={"warm_policy": FIXED, "min_ready": ready, "schedules": []})
        )
    return config.model_copy(update={"pools": pools})


# ---- results -----------------------------------------------------------------------


@dataclass
class PoolResult:
    leases: int = 0
    served: int = 0
    failed: int = 0
    wait_p50_s: float = 0.0
    wait_p95_s: float = 0.0
    wait_p99_s: float = 0.0
    wait_max_s: float = 0.0
    warm_hit_rate: float = 0.0
    idle_worker_minutes: float = 0.0
    worker_minutes: float = 0.0
    creations: int = 0
    cost: float | None = None


@dataclass
class Result:
    pools: dict[str, PoolResult]
    simulated_hours: float
    policy: str
    seed: int
    passes: int = 0
    events: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "pools": {name: asdict(pool) for name, pool in self.pools.items()},
            "simulated_hours": self.simulated_hours,
            "policy": self.policy,
            "seed": self.seed,
            "passes": self.passes,
            "events": self.events,
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ---- the replay --------------------------------------------------------------------


# An event on the replay's queue: (at, seq, kind, payload). A plain tuple: the heap
# compares the first two in C (a dataclass's ``__lt__`` was ~70 Python calls a request).
_Event = tuple[float, int, str, Any]
# The events a tenant or an agent causes, counted in ``Result.events``.
_COUNTED = frozenset({"request", "ready", "release"})
_KINDS = ("request", "demand", "ready", "release", "destroy", "tick")  # handled by _on_<kind>
# The events after which a pending lease may have left ``pending``: served by a request's
# call (``serve_pending_of``), a ready callback or the full pass, or expired by the pass.
# Demand and destroy passes and releases start and end workers, never serve or end a
# pending lease (a released worker is destroyed, not handed on).
_SETTLING = frozenset({"request", "ready", "tick"})


class Replay:
    """One replay of a trace against one config; ``run()`` returns the result."""

    def __init__(
        self, config: Config, trace: Sequence[TraceRow], seed: int, start: datetime
    ) -> None:
        unknown = sorted({row.pool for row in trace} - {pool.name for pool in config.pools})
        if unknown:
            raise SimulationError(f"the trace names pools the config lacks: {', '.join(unknown)}")
        # In memory: one connection, nothing written to disk (a file in WAL mode cost
        # about a quarter of the replay's time in commits and page reads).
        self.config = config.model_copy(update={"database_url": MEMORY_URL})
        self.trace = trace
        self.start = start
        self.clock = VirtualClock(start - timedelta(seconds=WARM_UP_S))
        self.cloud = simulated_cloud(self.clock.now, self._agent_ready_at, seed)
        self.engine = _without_listing_indexes(prepare_database(self.config))
        self.rt = simulation_runtime(self.config, self.engine, self.clock, self.cloud)
        self.factory = self.rt.factory
        self.interval = float(self.config.scheduler.interval)
        self.doorbell = self.config.scheduler.doorbell
        self.provision_timeout = {pool.name: pool.provision_timeout for pool in config.pools}
        self.memo = HistoryMemo()
        # Read once: nothing in a replay changes a pool's settings (no admin calls).
        with session_scope(self.rt.read_factory) as session:
            policies = {pool.name: enabled_warm_policy(session, pool.name) for pool in config.pools}
        self.policies = {name: policy for name, policy in policies.items() if policy is not None}
        self._queue: list[_Event] = []
        self._seq = 0
        self._rung_at: float | None = None
        self._destroy_at: float | None = None
        self._tick_at: float | None = None
        self._failures = 0
        self._tenants: dict[str, str] = {}
        self._holds: dict[str, tuple[str, float]] = {}  # lease id -> tenant id, hold
        self._waiting: set[str] = set()  # pending leases: their release is not yet planned
        self._open_leases = 0
        self.passes = 0
        self.events = 0

    # -- the event queue -------------------------------------------------------------

    def _push(self, at: float, kind: str, payload: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, kind, payload))

    def _seconds(self, moment: datetime) -> float:
        return (moment - self.start).total_seconds()

    def _grid(self, at: float, step: float) -> float:
        """The first run of a pass every ``step`` seconds (from the warm-up's start) at or
        after ``at``: when the service's own scheduler would get to it."""
        return math.ceil((at + WARM_UP_S) / step - 1e-9) * step - WARM_UP_S

    def _agent_ready_at(
        self, worker_id: str, pool: str, bootstrap_token: str, at: datetime
    ) -> None:
        ready_s = self._seconds(at)
        self._push(ready_s, "ready", (worker_id, pool, bootstrap_token))
        timeout_s = self._seconds(self.clock.now()) + self.provision_timeout[pool]
        if ready_s >= timeout_s:  # the pass that times it out comes first
            self._plan_tick(timeout_s)

    def run(self) -> Result:
        self._create_tenants()
        for row in self.trace:
            self._push(row.time, "request", row)
        self._plan_tick(-WARM_UP_S)
        last_request = self.trace[-1].time if self.trace else 0.0
        now = done = 0.0  # done: the last event handled, where the figures end
        remembering = HISTORY_MEMO.set(self.memo)
        handlers = {kind: getattr(self, f"_on_{kind}") for kind in _KINDS}
        try:
            while self._queue:
                now, _, kind, payload = heapq.heappop(self._queue)
                if now > last_request and self._open_leases == 0:
                    break
                if now > last_request + DRAIN_LIMIT_S:
                    break
                self.clock.set(self.start + timedelta(seconds=now))
                handlers[kind](payload)
                if self._waiting and kind in _SETTLING:
                    self._collect_activations()
                if self.cloud.failures != self._failures:
                    self._after_create_failures()
                self.events += kind in _COUNTED
                done = now
        finally:
            HISTORY_MEMO.reset(remembering)
        return self._result(done)

    # -- what happens ----------------------------------------------------------------

    def _create_tenants(self) -> None:
        names = list(dict.fromkeys(row.tenant for row in self.trace))
        with session_scope(self.factory) as session:
            created = tenants.create_many(session, names, self.clock.now())
        self._tenants = {
            name: tenant_id for name, (tenant_id, _) in zip(names, created, strict=True)
        }

    def _on_request(self, row: TraceRow) -> None:
        now = self.clock.now()
        tenant_id = self._tenants[row.tenant]
        with session_scope(self.factory) as session:
            acquired = leasing.acquire(session, tenant_id, row.pool, now)
            lease_id = acquired.lease.id
        if acquired.outcome == Outcome.EXISTING:
            return  # the tenant's live lease answers; nothing new happens
        self.memo.requests_added(row.pool, now)  # the new lease's created_at
        lease = acquired.lease
        self._plan_deadlines(lease.idle_expires_at, lease.expires_at, lease.pending_expires_at)
        self._holds[lease_id] = (tenant_id, row.hold_seconds)
        self._open_leases += 1
        if acquired.outcome == Outcome.ACTIVE:
            self._push(self._seconds(now) + row.hold_seconds, "release", lease_id)
            self._ring()
            return
        self._waiting.add(lease_id)
        with session_scope(self.factory) as session:
            served = [lease.id for lease in leasing.serve_pending_of(session, row.pool, now)]
        if lease_id not in served:
            self._ring(pending=True)

    def _ring(self, pending: bool = False) -> None:
        now = self._seconds(self.clock.now())
        if not self.doorbell:
            if pending:  # the demand poll finds it
                self._push(now + self.config.scheduler.demand_interval, "demand", False)
            return
        if pending:
            self._push(now, "demand", False)
        if self._rung_at is None or self._rung_at < now:
            self._rung_at = now + RING_SETTLE_S
            self._push(self._rung_at, "demand", True)

    def _on_demand(self, rung: bool) -> None:
        self.passes += 1
        answer_demand(self.rt, self.clock.now(), rung=rung)

    def _on_ready(self, agent: tuple[str, str, str]) -> None:
        worker_id, pool, bootstrap_token = agent
        if worker_id not in self.cloud.machines:
            return  # destroyed before its agent came up
        now = self.clock.now()
        planned = None if self._tick_at is None else self.start + timedelta(seconds=self._tick_at)
        try:
            # The trim check reads in the callback's own transaction, after it: one
            # transaction fewer per worker, and what it reads is what a commit would show.
            with session_scope(self.factory) as session:
                ready = worker_ready(session, worker_id, bootstrap_token, _AGENT_URL, None, now)
                self.memo.provisioning_added(pool, now, ready.provisioned_s)
                # One more ready worker: trim may find a surplus sooner; nothing else
                # moved. A trim due within a second before the pass already planned, or
                # later, would not move it (``_plan_tick`` keeps the sooner, on the grid).
                policy = self.policies.get(pool)
                due = None if policy is None else next_trim_due(session, pool, policy, now, planned)
        except (Conflict, NotFound):
            return  # failed or timed out meanwhile: the service answers the agent 4xx
        if due is not None:
            self._plan_tick(self._seconds(due))

    def _collect_activations(self) -> None:
        """Plan the release of pending leases that became active (in whichever step)."""
        with session_scope(self.rt.read_factory) as session:
            rows = session.execute(
                sa_select(
                    col(Lease.id),
                    col(Lease.activated_at),
                    col(Lease.state),
                    col(Lease.idle_expires_at),
                    col(Lease.expires_at),
                ).where(
                    col(Lease.id).in_(list(self._waiting)), col(Lease.state) != LeaseState.PENDING
                )
            ).all()
        for lease_id, activated, state, idle_expires, expires in rows:
            self._waiting.discard(lease_id)
            if activated is not None and state == LeaseState.ACTIVE:
                hold = self._holds[lease_id][1]
                self._push(self._seconds(_aware(activated)) + hold, "release", lease_id)
                self._plan_deadlines(idle_expires, expires)

    def _on_release(self, lease_id: str) -> None:
        tenant_id, _ = self._holds[lease_id]
        with session_scope(self.factory) as session:
            leasing.release(session, tenant_id, lease_id, self.clock.now())
        self._open_leases = max(0, self._open_leases - 1)
        self._plan_destroy()

    def _plan_destroy(self) -> None:
        """Leases wait: the room a destroy frees matters at the service's next interval.
        Otherwise destroys are batched every ``DESTROY_PASS_S``."""
        now = self._seconds(self.clock.now())
        at = self._grid(now + 1e-6, self.interval if self._waiting else DESTROY_PASS_S)
        if self._destroy_at is None or at < self._destroy_at:
            self._destroy_at = at
            self._push(at, "destroy", at)

    def _on_destroy(self, at: float) -> None:
        if at != self._destroy_at:
            return  # planned again, sooner
        self._destroy_at = None
        self.passes += 1
        destroy(self.rt, self.clock.now())
        if self._waiting:
            answer_demand(self.rt, self.clock.now())  # the poll: pending leases, room freed
        with session_scope(self.rt.read_factory) as session:
            short = refill_wanted(session, self.clock.now())
        if short:  # room freed under max_workers: the service's next full pass refills
            self._plan_tick(self._seconds(self.clock.now()))

    def _after_create_failures(self) -> None:
        """A failed create: the pool backs off (the pass resumes its refill when the
        backoff ends) and the failed worker is to be destroyed."""
        self._failures = self.cloud.failures
        self._plan_due()
        self._plan_destroy()

    # -- the full pass, when time gives it work --------------------------------------

    def _plan_tick(self, at: float) -> None:
        """Run the full pass at the service's first interval at or after ``at``."""
        at = self._grid(max(at, self._seconds(self.clock.now())), self.interval)
        if self._tick_at is None or at < self._tick_at:
            self._tick_at = at
            self._push(at, "tick", at)

    def _plan_deadlines(self, *moments: datetime | None) -> None:
        due = [self._seconds(_aware(m)) for m in moments if m is not None]
        if due:
            self._plan_tick(min(due))

    def _plan_due(self) -> None:
        with session_scope(self.rt.read_factory) as session:
            due = next_due(session, self.clock.now())
        if due is not None:
            self._plan_tick(self._seconds(due))

    def _on_tick(self, at: float) -> None:
        if at != self._tick_at:
            return  # planned again, sooner
        self._tick_at = None
        # Asked first: most planned ticks find nothing (a provisioning timeout or an idle
        # deadline met meanwhile, a trim moment planned up to a second early), and the
        # passes themselves cost ~4x this read (83 % of a simulated day's ticks).
        due = self._next_due()
        if due is not None and due <= self.clock.now():
            self.passes += 1
            maintain(self.rt, self.clock.now())
            destroy(self.rt, self.clock.now())
            due = self._next_due()
        if due is not None:  # at most once per interval, as the service's scheduler
            self._plan_tick(self._after_this_tick(self._seconds(due)))

    def _next_due(self) -> datetime | None:
        """``due.next_due`` now, the open leases counted in the same read."""
        with session_scope(self.rt.read_factory) as session:
            [(self._open_leases,)] = _OPEN_LEASES.all(core_connection(session), {})
            runs_at = self._next_tick_for if self.interval > 1 else None
            return next_due(session, self.clock.now(), runs_at)

    def _after_this_tick(self, at: float) -> float:
        return max(at, self._seconds(self.clock.now()) + self.interval)

    def _next_tick_for(self, due: datetime) -> datetime:
        """The tick ``_on_tick`` plans for a pass due at ``due`` (``next_due``'s ``runs_at``)."""
        at = self._grid(self._after_this_tick(self._seconds(due)), self.interval)
        return self.start + timedelta(seconds=at)

    # -- the result ------------------------------------------------------------------

    def _result(self, end_s: float) -> Result:
        end = self.start + timedelta(seconds=end_s)
        with session_scope(self.rt.read_factory) as session:
            pools = {pool.name: PoolResult() for pool in self.config.pools}
            _lease_figures(session, pools, end)
            _worker_figures(session, pools, self.start, end)
        for pool in self.config.pools:
            if pool.cost_per_hour is not None:
                pools[pool.name].cost = round(
                    pools[pool.name].worker_minutes / 60 * pool.cost_per_hour, 2
                )
        return Result(pools, round(end_s / 3600, 3), "", 0, self.passes, self.events)

    def close(self) -> None:
        self.rt.close()
        close_held(self.rt.factory, self.rt.read_factory)
        self.engine.dispose()


def _lease_figures(session: Session, pools: dict[str, PoolResult], end: datetime) -> None:
    waits: dict[str, list[float]] = defaultdict(list)
    hits: dict[str, int] = defaultdict(int)
    # The columns read, not ORM rows: loading a simulated week's leases and workers as
    # objects took ~1.4 s (3 % of its replay).
    for lease in session.execute(
        sa_select(
            col(Lease.pool),
            col(Lease.state),
            col(Lease.created_at),
            col(Lease.activated_at),
            col(Lease.ended_at),
        )
    ).all():
        result = pools[lease.pool]
        result.leases += 1
        if lease.activated_at is not None:
            result.served += 1
            hits[lease.pool] += lease.activated_at == lease.created_at
        elif lease.state == LeaseState.FAILED:
            result.failed += 1
        settled = lease.activated_at or lease.ended_at or end
        waits[lease.pool].append((settled - lease.created_at).total_seconds())
    for name, values in waits.items():
        result = pools[name]
        result.wait_p50_s = round(percentile(values, 0.50), 3)
        result.wait_p95_s = round(percentile(values, 0.95), 3)
        result.wait_p99_s = round(percentile(values, 0.99), 3)
        result.wait_max_s = round(max(values), 3)
        result.warm_hit_rate = round(hits[name] / len(values), 4)


def _worker_figures(
    session: Session, pools: dict[str, PoolResult], start: datetime, end: datetime
) -> None:
    for worker in session.execute(_WORKER_SPANS).all():
        result = pools[worker.pool]
        # Until the service decided to destroy it: the replay's destroy pass runs on its
        # own cadence, and a platform's termination time is not modelled.
        gone = end if worker.gone is None else _aware(worker.gone)
        if gone <= start:
            continue  # came and went during the warm-up
        result.creations += worker.created_at >= start
        result.worker_minutes += (gone - max(worker.created_at, start)).total_seconds() / 60
        if worker.ready_at is not None:
            stop = end if worker.stopped is None else _aware(worker.stopped)
            idle_from = max(worker.ready_at, start)
            result.idle_worker_minutes += max(0.0, (stop - idle_from).total_seconds() / 60)
    for result in pools.values():
        result.worker_minutes = round(result.worker_minutes, 1)
        result.idle_worker_minutes = round(result.idle_worker_minutes, 1)


def _first_move(*states: str) -> Any:
    """The first time a worker moved to one of ``states`` (its audit rows), else NULL."""
    return func.min(case((col(Event.to_state).in_(states), col(Event.at))))


# Each worker with the first time it stopped being idle (leased, destroying, failed) and
# the first time it was going (the decision to destroy it): one row a worker, not one a
# worker and state (a simulated week's ~50,000 audit rows read as objects took 0.6 s).
_MOVES = (
    sa_select(
        col(Event.subject_id).label("worker_id"),
        _first_move("leased", "destroying", "failed").label("stopped"),
        _first_move("destroying", "destroyed").label("gone"),
    )
    .where(col(Event.kind) == "worker")
    .group_by(col(Event.subject_id))
    .subquery()
)
_WORKER_SPANS = sa_select(
    col(Worker.pool), col(Worker.created_at), col(Worker.ready_at), _MOVES.c.stopped, _MOVES.c.gone
).outerjoin(_MOVES, _MOVES.c.worker_id == col(Worker.id))


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@contextmanager
def _quiet_service_logs() -> Iterator[None]:
    """Per-worker INFO lines (and each simulated create failure) would drown the output."""
    logger = logging.getLogger("workerlease")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def simulate(
    config: Config,
    trace: Sequence[TraceRow],
    policy: str = "config",
    seed: int = 0,
    start: datetime = DEFAULT_START,
) -> Result:
    """Replay ``trace`` against ``config`` under ``policy``; deterministic for a seed."""
    configured = with_policy(config, policy)
    with _quiet_service_logs():
        replay = Replay(configured, trace, seed, start)
        try:
            result = replay.run()
        finally:
            replay.close()
    result.policy, result.seed = policy, seed
    return result


# ---- comparing policies ------------------------------------------------------------


@dataclass
class Comparison:
    """Adaptive against the fixed ``min_ready`` that reaches the best p95 wait."""

    pool: str
    adaptive: PoolResult
    best_fixed: int
    best: PoolResult
    tried: dict[int, PoolResult]

    @property
    def idle_saved(self) -> float:
        """1 - adaptive's idle worker-minutes / the best fixed one's."""
        if not self.best.idle_worker_minutes:
            return 0.0
        return round(1 - self.adaptive.idle_worker_minutes / self.best.idle_worker_minutes, 3)


def compare(config: Config, trace: Sequence[TraceRow], pool: str, seed: int = 0) -> Comparison:
    """The adaptive policy, and the smallest fixed ``min_ready`` whose p95 wait is the best
    any fixed value reaches (``max_workers`` gives that best; p95 falls as N grows, so a
    bisection finds the smallest N that matches it)."""
    [settings] = [p for p in config.pools if p.name == pool]
    runs: dict[int, PoolResult] = {}

    def fixed(n: int) -> PoolResult:
        if n not in runs:
            runs[n] = simulate(config, trace, f"fixed:{n}", seed).pools[pool]
        return runs[n]

    adaptive = simulate(config, trace, ADAPTIVE, seed).pools[pool]
    best_p95 = fixed(settings.max_workers).wait_p95_s
    low, high = 0, settings.max_workers
    while low < high:
        middle = (low + high) // 2
        if fixed(middle).wait_p95_s <= best_p95:
            high = middle
        else:
            low = middle + 1
    return Comparison(pool, adaptive, low, fixed(low), dict(sorted(runs.items())))
