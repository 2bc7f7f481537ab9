"""Turn rows into response models. The only place that decides what a caller may see."""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import Session, col, select

from service.leasing import LeaseRecord, WorkerRecord
from service.listing import Waiting, waiting_reasons
from service.models import EndReason, Lease, LeaseState, Pool, Task, Worker
from service.schemas import (
    ContainerSpec,
    LeaseOut,
    TaskOut,
    WaitingKind,
    WaitingReason,
    WorkerOut,
)


def leases_out(
    session: Session, leases: Sequence[Lease], *, viewer_tenant_id: str | None
) -> list[LeaseOut]:
    """Leases with their workers; the access token only for the lease's own tenant."""
    worker_ids = [lease.worker_id for lease in leases if lease.worker_id]
    workers: dict[str, Worker] = {}
    if len(worker_ids) == 1:
        # The common case (one lease just acquired): the session already holds the row.
        worker = session.get(Worker, worker_ids[0])
        workers = {worker.id: worker} if worker else {}
    elif worker_ids:
        workers = {
            w.id: w
            for w in session.exec(select(Worker).where(col(Worker.id).in_(worker_ids))).all()
        }
    pool_os = {name: _pool_os(session, name) for name in {lease.pool for lease in leases}}
    waiting = waiting_reasons(session, leases)
    return [
        _lease_out(
            lease,
            workers.get(lease.worker_id or ""),
            pool_os[lease.pool],
            viewer_tenant_id,
            waiting.get(lease.id),
        )
        for lease in leases
    ]


def _pool_os(session: Session, name: str) -> str:
    pool = session.get(Pool, name)  # from the session's identity map after the first lookup
    return pool.os if pool else ""


def lease_out(
    session: Session, lease: Lease | LeaseRecord, *, viewer_tenant_id: str | None
) -> LeaseOut:
    if isinstance(lease, LeaseRecord):
        # The warm path's answer (active or released, never waiting): its statements
        # returned every row it shows.
        return _lease_out(lease, lease.worker, lease.pool_os, viewer_tenant_id)
    return leases_out(session, [lease], viewer_tenant_id=viewer_tenant_id)[0]


def waiting_reason_out(waiting: Waiting) -> WaitingReason:
    return WaitingReason(
        kind=WaitingKind(waiting.kind),
        detail=_waiting_detail(waiting),
        leases_ahead=waiting.leases_ahead,
        workers_on_the_way=waiting.workers_on_the_way,
        time_to_worker_s=waiting.time_to_worker_s,
        degraded_reason=waiting.degraded_reason,
    )


def _waiting_detail(waiting: Waiting) -> str:
    ahead = f"; {waiting.leases_ahead} lease(s) ahead" if waiting.leases_ahead else ""
    if waiting.kind == WaitingKind.WORKER_ON_ITS_WAY:
        usual = (
            f" (workers of this pool took {waiting.time_to_worker_s:.0f} s lately)"
            if waiting.time_to_worker_s is not None
            else ""
        )
        return f"a worker is on its way{usual}{ahead}"
    if waiting.kind == WaitingKind.PROVISIONER_DEGRADED:
        return f"the pool's provisioner is failing: {waiting.degraded_reason}{ahead}"
    if waiting.kind == WaitingKind.POOL_AT_MAX_WORKERS:
        return (
            f"the pool is at max_workers ({waiting.max_workers}): waiting for a worker "
            f"to be released{ahead}"
        )
    return (
        f"{waiting.leases_ahead} lease(s) ahead in the queue for the pool's "
        f"max_workers ({waiting.max_workers}) workers"
    )


def _lease_out(
    lease: Lease | LeaseRecord,
    worker: Worker | WorkerRecord | None,
    pool_os: str,
    viewer_tenant_id: str | None,
    waiting: Waiting | None = None,
) -> LeaseOut:
    worker_out = None
    if worker is not None:
        # A worker of an ended lease is being destroyed: its token is of no use and
        # is not shown any more.
        show_token = viewer_tenant_id == lease.tenant_id and lease.state == LeaseState.ACTIVE
        worker_out = WorkerOut(
            id=worker.id,
            pool=worker.pool,
            os=pool_os,
            address=worker.address,
            agent_url=worker.agent_url,
            access_token=worker.access_token if show_token else None,
        )
    return LeaseOut(
        id=lease.id,
        tenant_id=lease.tenant_id,
        pool=lease.pool,
        state=LeaseState(lease.state),
        created_at=lease.created_at,
        activated_at=lease.activated_at,
        idle_expires_at=lease.idle_expires_at,
        expires_at=lease.expires_at,
        ended_at=lease.ended_at,
        end_reason=EndReason(lease.end_reason) if lease.end_reason else None,
        worker=worker_out,
        waiting_reason=waiting_reason_out(waiting) if waiting else None,
    )


def task_out(task: Task) -> TaskOut:
    """A task as its tenant sees it: never its script, env or files."""
    return TaskOut(
        id=task.id,
        lease_id=task.lease_id,
        state=task.state,  # type: ignore[arg-type]
        exit_code=task.exit_code,
        error=task.error,
        created_at=task.created_at,
        started_at=task.started_at,
        finished_at=task.finished_at,
        shell=task.shell,  # type: ignore[arg-type]
        timeout_s=task.timeout_s,
        container=ContainerSpec(image=task.container_image) if task.container_image else None,
        log_bytes=task.log_bytes,
    )
