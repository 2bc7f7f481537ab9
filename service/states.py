"""The worker and lease state machines: transition tables and the one function that moves rows.

Every state change in the service goes through :func:`move_worker` or
:func:`move_lease`. A move the table forbids is a bug and raises.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session

from service.models import Event, Lease, LeaseState, Worker, WorkerState

WORKER_TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.PROVISIONING: frozenset(
        {WorkerState.READY, WorkerState.FAILED, WorkerState.DESTROYING}
    ),
    WorkerState.READY: frozenset({WorkerState.LEASED, WorkerState.FAILED, WorkerState.DESTROYING}),
    # A leased worker whose machine vanished fails (its lease ends as failed).
    WorkerState.LEASED: frozenset({WorkerState.DESTROYING, WorkerState.FAILED}),
    WorkerState.FAILED: frozenset({WorkerState.DESTROYING}),
    WorkerState.DESTROYING: frozenset({WorkerState.DESTROYED}),
    WorkerState.DESTROYED: frozenset(),
}

LEASE_TRANSITIONS: dict[LeaseState, frozenset[LeaseState]] = {
    LeaseState.PENDING: frozenset(
        {LeaseState.ACTIVE, LeaseState.FAILED, LeaseState.RELEASED, LeaseState.REVOKED}
    ),
    LeaseState.ACTIVE: frozenset(
        {LeaseState.RELEASED, LeaseState.EXPIRED, LeaseState.REVOKED, LeaseState.FAILED}
    ),
    LeaseState.RELEASED: frozenset(),
    LeaseState.EXPIRED: frozenset(),
    LeaseState.REVOKED: frozenset(),
    LeaseState.FAILED: frozenset(),
}


class InvalidTransition(RuntimeError):
    """A state change that the transition table does not allow: a bug, never user error."""


def move_worker(
    session: Session, worker: Worker, to: WorkerState, reason: str, now: datetime
) -> None:
    current = WorkerState(worker.state)
    if to not in WORKER_TRANSITIONS[current]:
        raise InvalidTransition(f"worker {worker.id}: {current} -> {to} is not allowed ({reason})")
    worker.state = to
    worker.state_changed_at = now
    session.add(worker)
    session.add(
        Event(
            at=now,
            kind="worker",
            subject_id=worker.id,
            from_state=current,
            to_state=to,
            reason=reason,
            pool=worker.pool,
        )
    )


def move_lease(session: Session, lease: Lease, to: LeaseState, reason: str, now: datetime) -> None:
    current = LeaseState(lease.state)
    if to not in LEASE_TRANSITIONS[current]:
        raise InvalidTransition(f"lease {lease.id}: {current} -> {to} is not allowed ({reason})")
    lease.state = to
    session.add(lease)
    session.add(
        Event(
            at=now,
            kind="lease",
            subject_id=lease.id,
            from_state=current,
            to_state=to,
            reason=reason,
            pool=lease.pool,
            tenant_id=lease.tenant_id,
        )
    )


def record(
    session: Session,
    kind: str,
    subject_id: str,
    reason: str,
    now: datetime,
    pool: str | None = None,
    tenant_id: str | None = None,
) -> None:
    """An audit event that is not a state transition (tenant created, pool patched)."""
    session.add(
        Event(
            at=now, kind=kind, subject_id=subject_id, reason=reason, pool=pool, tenant_id=tenant_id
        )
    )
