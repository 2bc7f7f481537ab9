"""Scheduler wiring only: which pass runs how often. The passes live in the domain modules.

Start one scheduler per deployment process group (``serve`` starts it in its
own process, never at import time, never once per forked web worker); every
pass is also safe when several replicas run it at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, select

from service import metrics
from service.clock import Clock
from service.config import SchedulerConfig
from service.db import session_scope
from service.leasing import expire, fail_pending_of_disabled_pools, serve_pending
from service.models import Pool
from service.pools import plan_refill, trim
from service.provisioning import ProvisionerSet
from service.workers import (
    check_health,
    claim_creates,
    claim_destroys,
    create_workers,
    destroy_workers,
    provision_timeouts,
    reconcile,
)

log = logging.getLogger("workerlease.jobs")


@dataclass
class Runtime:
    factory: sessionmaker[Session]
    provisioners: ProvisionerSet
    clock: Clock
    settings: SchedulerConfig


def maintain(rt: Runtime, now: datetime | None = None) -> None:
    """Expire, check health, serve pending leases, trim and refill: one pass over all pools."""
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
    with session_scope(rt.factory) as session:
        plan_refill(session, now)
    with session_scope(rt.factory) as session:
        claimed = claim_creates(session, now)
    create_workers(rt.factory, rt.provisioners, claimed, now,
                   max_parallel=rt.settings.max_concurrent_creates)


def destroy(rt: Runtime, now: datetime | None = None) -> None:
    now = now or rt.clock.now()
    with session_scope(rt.factory) as session:
        claimed = claim_destroys(session, now)
    if claimed:
        destroy_workers(rt.factory, rt.provisioners, claimed, now)


def reconcile_job(rt: Runtime, now: datetime | None = None) -> None:
    reconcile(rt.factory, rt.provisioners, now or rt.clock.now())


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


def start_scheduler(rt: Runtime) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(
        job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": 30},
        timezone="UTC",
    )
    now = datetime.now().astimezone()
    interval = rt.settings.interval
    # Reconcile first, at start, so a crash's leftovers go before anything new is made.
    scheduler.add_job(instrumented("reconcile", reconcile_job, rt), "interval",
                      seconds=rt.settings.reconcile_interval, id="reconcile", next_run_time=now)
    scheduler.add_job(instrumented("maintain", maintain, rt), "interval", seconds=interval,
                      id="maintain", next_run_time=now)
    scheduler.add_job(instrumented("destroy", destroy, rt), "interval", seconds=interval,
                      id="destroy", next_run_time=now)
    scheduler.start()
    log.info("scheduler_started interval=%ss reconcile_interval=%ss", interval,
             rt.settings.reconcile_interval)
    return scheduler
