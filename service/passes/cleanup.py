"""Cleanup: destroy every resource of this deployment once its service has stopped.

``workerlease cleanup`` (``make stop``) runs it. Local agents and containers outlive
``serve`` on purpose (a restart finds them again); when the deployment is to go, this
drains the database (leases end, workers go to ``destroying``), destroys those
workers through their pools' provisioners and marks them destroyed, then destroys
whatever the provisioners still list under this deployment and installation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from sqlmodel import col, select

from service.db import session_scope
from service.models import Worker, WorkerState
from service.passes.destroy import destroy_batch
from service.passes.reconcile import reconcile
from service.passes.runtime import Runtime
from service.workers import claim_destroys, drain_deployment

log = logging.getLogger("workerlease.passes.cleanup")

REASON = "deployment cleaned up by operator (workerlease cleanup)"


@dataclass
class CleanupReport:
    leases_ended: int = 0
    workers_destroyed: int = 0
    orphans_destroyed: int = 0
    # Workers whose destroy failed: id -> last error (they stay ``destroying``).
    failed: dict[str, str] = field(default_factory=dict)


def cleanup(rt: Runtime, now: datetime | None = None) -> CleanupReport:
    now = now or rt.clock.now()
    report = CleanupReport()
    with session_scope(rt.factory) as session:
        report.leases_ended, _ = drain_deployment(session, now, REASON)
    for pool in rt.pools():
        with session_scope(rt.factory) as session:
            claimed = claim_destroys(session, pool.name, now, limit=100_000)
        size = rt.provisioners.for_pool(pool).destroy_batch_size
        for start in range(0, len(claimed), size):
            report.workers_destroyed += destroy_batch(rt, pool, claimed[start : start + size], now)
    report.orphans_destroyed = reconcile(rt)
    with session_scope(rt.read_factory) as session:
        left = session.exec(
            select(Worker.id, Worker.last_error).where(col(Worker.state) == WorkerState.DESTROYING)
        ).all()
    report.failed = {worker_id: error or "" for worker_id, error in left}
    log.info(
        "cleanup_done leases_ended=%d workers_destroyed=%d orphans_destroyed=%d failed=%d",
        report.leases_ended,
        report.workers_destroyed,
        report.orphans_destroyed,
        len(report.failed),
    )
    return report
