"""Scheduler wiring only: which pass runs how often. The passes live in the domain modules.

Start one scheduler per deployment process group (``serve`` starts it in its
own process, never at import time, never once per forked web worker); every
pass is also safe when several replicas run it at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from apscheduler.events import EVENT_SCHEDULER_SHUTDOWN, SchedulerEvent
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from service import metrics
from service.clock import Clock
from service.config import SchedulerConfig
from service.db import session_factory, session_scope
from service.dispatch import PoolDispatcher
from service.doorbell import Bell, NoBell
from service.leasing import expire, fail_pending_of_disabled_pools, serve_pending
from service.models import Pool
from service.pools import counts_by_pool, plan_refill, trim, workers_wanted
from service.provisioning import ProvisionerSet
from service.workers import (
    check_health,
    claim_creates,
    claim_destroys,
    create_one,
    destroy_workers,
    provision_timeouts,
    reconcile,
)

log = logging.getLogger("workerlease.jobs")


DESTROYS_PER_POOL = 8
STOP_CHECK_S = 0.5  # how soon the demand loop notices stop()


@dataclass
class Runtime:
    factory: sessionmaker[Session]
    provisioners: ProvisionerSet
    clock: Clock
    settings: SchedulerConfig
    bell: Bell = field(default_factory=NoBell)
    creates: PoolDispatcher = field(init=False)
    destroys: PoolDispatcher = field(init=False)
    read_factory: sessionmaker[Session] = field(init=False)

    def __post_init__(self) -> None:
        bind = self.factory.kw["bind"]
        self.read_factory = session_factory(bind, read_only=True)
        self.creates = PoolDispatcher("create", self.settings.max_concurrent_creates)
        self.destroys = PoolDispatcher(
            "destroy", per_pool=DESTROYS_PER_POOL, max_queued=DESTROYS_PER_POOL
        )

    def close(self) -> None:
        self.creates.shutdown()
        self.destroys.shutdown()
        self.provisioners.close()


def maintain(rt: Runtime, now: datetime | None = None, wait: bool = True) -> None:
    """Expire, check health, serve pending leases, trim and refill: one pass over all pools.

    Creates run in the background (``rt.creates``); ``wait`` waits for them, as tests
    and one-off calls want. The scheduler does not wait.
    """
    now = now or rt.clock.now()
    with session_scope(rt.factory) as session:
        expire(session, now)
        fail_pending_of_disabled_pools(session, now)
        provision_timeouts(session, now)
    check_health(rt.factory, rt.provisioners, now)
    with session_scope(rt.factory) as session:
        for pool in session.exec(select(Pool)).all():
            serve_pending(session, pool, now)
        trim(session, now)
    refill(rt, now, wait)


def refill(rt: Runtime, now: datetime, wait: bool = True) -> None:
    """Plan the workers the pools lack, then start creating them in the background."""
    with session_scope(rt.factory) as session:
        plan_refill(session, now)
    for pool in _pools(rt):
        slots = rt.creates.free_slots(pool.name)
        if slots == 0:
            continue
        with session_scope(rt.factory) as session:
            claimed = claim_creates(
                session, pool.name, now, slots, skip=rt.creates.in_flight(pool.name)
            )
        for worker in claimed:
            rt.creates.submit(
                pool.name, worker.id, create_one, rt.factory, rt.provisioners, pool, worker, now
            )
    if wait:
        rt.creates.wait()


def answer_demand(rt: Runtime, now: datetime | None = None, wait: bool = True) -> None:
    """Refill at once when pending leases outnumber the workers on their way.

    Runs far more often than ``maintain`` so a lease waiting with ``min_ready: 0`` (or
    a drained pool) does not also wait for the next full pass; it reads two indexed
    counts and writes nothing unless there is a gap to fill.
    """
    now = now or rt.clock.now()
    with session_scope(rt.read_factory) as session:
        counts = counts_by_pool(session)
        pools = {p.name: p for p in session.exec(select(Pool)).all()}
    if any(
        pools[name].enabled and workers_wanted(pools[name], c) > 0 and c.pending_leases > 0
        for name, c in counts.items()
        if name in pools
    ):
        refill(rt, now, wait)


def destroy(rt: Runtime, now: datetime | None = None, wait: bool = True) -> None:
    """Destroy workers in ``destroying``, in batches the pool's provisioner likes.

    Several batches of a pool run at once, so one hanging destroy holds up only itself.
    """
    now = now or rt.clock.now()
    for pool in _pools(rt):
        slots = rt.destroys.free_slots(pool.name)
        if slots == 0:
            continue
        size = rt.provisioners.for_pool(pool).destroy_batch_size
        with session_scope(rt.factory) as session:
            claimed = claim_destroys(session, pool.name, now, limit=slots * size)
        for start in range(0, len(claimed), size):
            batch = claimed[start : start + size]
            rt.destroys.submit(
                pool.name,
                batch[0].id,
                destroy_workers,
                rt.factory,
                rt.provisioners,
                pool,
                batch,
                now,
            )
    if wait:
        rt.destroys.wait()


def _pools(rt: Runtime) -> list[Pool]:
    with session_scope(rt.read_factory) as session:
        return list(session.exec(select(Pool).order_by(col(Pool.name))).all())


def reconcile_job(rt: Runtime, now: datetime | None = None) -> None:
    reconcile(rt.factory, rt.provisioners, now or rt.clock.now())


def _no_wait(job: Callable[..., None]) -> Callable[[Runtime], None]:
    def run(rt: Runtime) -> None:
        job(rt, wait=False)

    return run


def instrumented(name: str, job: Callable[[Runtime], None], rt: Runtime) -> Callable[[], None]:
    """A failing run logs and counts, and the next run tries again."""

    def run() -> None:
        started = time.perf_counter()
        try:
            job(rt)
        except Exception:
            metrics.JOB_RUNS.labels(name, "error").inc()
            log.exception("job_failed job=%s", name)
        else:
            metrics.JOB_RUNS.labels(name, "ok").inc()
        finally:
            metrics.JOB_DURATION.labels(name).observe(time.perf_counter() - started)

    return run


class DemandLoop:
    """The demand pass, run when the doorbell rings or every ``demand_interval``.

    A thread of its own rather than an APScheduler job: a ring must start a pass at
    once, and a ring during a pass must start another right after it (the lease may
    have committed after the pass read the counts), never two passes at once.
    """

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._stop = threading.Event()
        self._run_pass = instrumented("demand", _no_wait(answer_demand), rt)
        # Bound now, not in the thread: a ring sent once the scheduler is up is heard.
        self._listener = rt.bell.listener()
        self._thread = threading.Thread(target=self._loop, name="demand", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        interval = self._rt.settings.demand_interval
        try:
            while not self._stop.is_set():
                try:
                    if self._wait_for_ring(interval):
                        metrics.DOORBELL.labels("woke").inc()
                except Exception:  # a broken bell must not stop the poll
                    metrics.DOORBELL.labels("listen_error").inc()
                    log.exception("doorbell_wait_failed; polling")
                    self._stop.wait(interval)
                if not self._stop.is_set():
                    self._run_pass()
        finally:
            self._listener.close()

    def _wait_for_ring(self, interval: float) -> bool:
        """True when the bell rang, False after ``interval``; soon after ``stop()`` either way."""
        deadline = time.monotonic() + interval
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._listener.wait(min(remaining, STOP_CHECK_S)):
                return True
        return False


def start_scheduler(rt: Runtime) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(
        job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": 30},
        timezone="UTC",
    )
    now = datetime.now().astimezone()
    interval = rt.settings.interval
    # Reconcile first, at start, so a crash's leftovers go before anything new is made.
    scheduler.add_job(
        instrumented("reconcile", reconcile_job, rt),
        "interval",
        seconds=rt.settings.reconcile_interval,
        id="reconcile",
        next_run_time=now,
    )
    scheduler.add_job(
        instrumented("maintain", _no_wait(maintain), rt),
        "interval",
        seconds=interval,
        id="maintain",
        next_run_time=now,
    )
    scheduler.add_job(
        instrumented("destroy", _no_wait(destroy), rt),
        "interval",
        seconds=interval,
        id="destroy",
        next_run_time=now,
    )
    demand = DemandLoop(rt)

    def stop_demand(_event: SchedulerEvent) -> None:
        demand.stop()

    scheduler.add_listener(stop_demand, EVENT_SCHEDULER_SHUTDOWN)
    scheduler.start()
    demand.start()
    log.info(
        "scheduler_started interval=%ss reconcile_interval=%ss",
        interval,
        rt.settings.reconcile_interval,
    )
    return scheduler
