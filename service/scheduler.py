"""Scheduler wiring, and only that: which pass runs how often, counted and logged.

The passes live in ``service.passes``. Start one scheduler per deployment process
group (``serve`` starts ``workerlease scheduler`` as its own process, never at
import time, never once per forked web worker); every pass is also safe when
several replicas run it at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime

from apscheduler.events import EVENT_SCHEDULER_SHUTDOWN, SchedulerEvent
from apscheduler.schedulers.background import BackgroundScheduler

from service import heartbeats, metrics
from service.db import checkpoint_wal, session_scope
from service.passes.destroy import destroy
from service.passes.maintain import answer_demand, maintain
from service.passes.reconcile import reconcile
from service.passes.runtime import Runtime
from service.workers import release_claims

log = logging.getLogger("workerlease.scheduler")

STOP_CHECK_S = 0.1  # how soon the demand loop notices stop() (every stop waits for it)
# A ring's ready-deficit refill waits this long so a burst of warm takes is one pass.
# Measured (bench --only refill, 10 takes at once, SQLite): a pass per ring made the
# burst's own leases p50 191 ms (no ring: 56 ms) and the refill no faster (1.7 s);
# settling 0.1 s gave 49 ms and 1.2 s. Pending leases do not wait for it.
RING_SETTLE_S = 0.1


# How often the scheduler checkpoints SQLite's write-ahead log for the whole deployment,
# so that the web worker's commits need not (``db.WEB_CHECKPOINT_PAGES``).
CHECKPOINT_INTERVAL_S = 1.0


def _reconcile(rt: Runtime) -> None:
    reconcile(rt)


def _checkpoint(rt: Runtime) -> None:
    checkpoint_wal(rt.factory.kw["bind"])


def _no_wait(job: Callable[..., None]) -> Callable[[Runtime], None]:
    def run(rt: Runtime) -> None:
        job(rt, wait=False)

    return run


def _rung(job: Callable[..., None]) -> Callable[..., None]:
    def run(rt: Runtime, wait: bool = True) -> None:
        job(rt, wait=wait, rung=True)

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

    Every wake-up first answers pending leases (the poll's check). A ring then also
    refills pools short of their ready target (a lease took a ready worker), after
    ``RING_SETTLE_S`` so that the rings of one burst make one pass.

    A thread of its own rather than an APScheduler job: a ring must start a pass at
    once, and a ring during a pass must start another right after it (the lease may
    have committed after the pass read the counts), never two passes at once.
    """

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._stop = threading.Event()
        self._poll_pass = instrumented("demand", _no_wait(answer_demand), rt)
        self._rung_pass = instrumented("demand", _no_wait(_rung(answer_demand)), rt)
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
                rung = False
                try:
                    rung = self._wait_for_ring(interval)
                    if rung:
                        metrics.DOORBELL.labels("woke").inc()
                except Exception:  # a broken bell must not stop the poll
                    metrics.DOORBELL.labels("listen_error").inc()
                    log.exception("doorbell_wait_failed; polling")
                    self._stop.wait(interval)
                if self._stop.is_set():
                    break
                self._poll_pass()  # pending leases first, at once, whatever rang
                if rung and not self._stop.wait(RING_SETTLE_S):
                    self._listener.wait(0.001)  # the burst's other rings: this same pass
                    self._rung_pass()
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
    jobs: list[tuple[str, Callable[[Runtime], None], float]] = [
        ("reconcile", _reconcile, rt.settings.reconcile_interval),
        ("maintain", _no_wait(maintain), interval),
        ("destroy", _no_wait(destroy), interval),
    ]
    if rt.factory.kw["bind"].dialect.name == "sqlite":
        jobs.append(("checkpoint", _checkpoint, CHECKPOINT_INTERVAL_S))
    for name, job, every in jobs:
        scheduler.add_job(
            instrumented(name, job, rt), "interval", seconds=every, id=name, next_run_time=now
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


def run_scheduler(rt: Runtime) -> BackgroundScheduler:
    """Take back claims a stopped scheduler left, start the jobs and the heartbeat."""
    with session_scope(rt.factory) as session:
        released = release_claims(session)
    if released:
        log.info("claims_released count=%d (left by a scheduler that stopped)", released)
    scheduler = start_scheduler(rt)
    scheduler.add_job(
        beat,
        "interval",
        args=[rt],
        seconds=rt.settings.interval,
        id="heartbeat",
        next_run_time=datetime.now().astimezone(),
    )
    return scheduler


def beat(rt: Runtime) -> None:
    """The heartbeat ``/readyz`` reads; a failure is logged and the next beat tries again."""
    try:
        with session_scope(rt.factory) as session:
            heartbeats.beat(session, heartbeats.SCHEDULER, rt.clock.now())
    except Exception:
        log.warning("heartbeat_failed", exc_info=True)


def mark_stopped(rt: Runtime) -> None:
    """The last beat says this scheduler stopped cleanly (``workerlease cleanup`` reads it)."""
    try:
        with session_scope(rt.factory) as session:
            heartbeats.stopped(session, heartbeats.SCHEDULER, rt.clock.now())
    except Exception:
        log.warning("heartbeat_stop_failed", exc_info=True)
