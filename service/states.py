"""The worker, lease and task state machines: transition tables and the functions that move rows.

Every state change in the service goes through :func:`move_worker`,
:func:`move_lease` or :func:`move_task`. A move the table forbids is a bug and raises.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, event, insert
from sqlalchemy.orm import ORMExecuteState
from sqlmodel import Session

from service.db import transaction_connection
from service.driver_sql import DriverStatement
from service.models import Event, Lease, LeaseState, Task, TaskState, Worker, WorkerState

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

_TASK_ENDS = frozenset(
    {
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.TIMED_OUT,
        TaskState.CANCELLED,
        TaskState.LOST,
    }
)
TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    # A queued task never ran: it can only be started, cancelled, or lost with its worker.
    TaskState.QUEUED: frozenset({TaskState.RUNNING, TaskState.CANCELLED, TaskState.LOST}),
    TaskState.RUNNING: _TASK_ENDS,
    **{end: frozenset() for end in _TASK_ENDS},
}


_TABLES: dict[str, dict[Any, frozenset[Any]]] = {
    "worker": WORKER_TRANSITIONS,
    "lease": LEASE_TRANSITIONS,
    "task": TASK_TRANSITIONS,
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
    _audit(session, now, "worker", worker.id, reason, current, to, pool=worker.pool)


def move_lease(session: Session, lease: Lease, to: LeaseState, reason: str, now: datetime) -> None:
    current = LeaseState(lease.state)
    if to not in LEASE_TRANSITIONS[current]:
        raise InvalidTransition(f"lease {lease.id}: {current} -> {to} is not allowed ({reason})")
    lease.state = to
    session.add(lease)
    _audit(
        session,
        now,
        "lease",
        lease.id,
        reason,
        current,
        to,
        pool=lease.pool,
        tenant_id=lease.tenant_id,
    )


def move_task(session: Session, task: Task, to: TaskState, reason: str, now: datetime) -> None:
    current = TaskState(task.state)
    if to not in TASK_TRANSITIONS[current]:
        raise InvalidTransition(f"task {task.id}: {current} -> {to} is not allowed ({reason})")
    task.state = to
    session.add(task)
    _audit(
        session,
        now,
        "task",
        task.id,
        reason,
        current,
        to,
        pool=task.pool,
        tenant_id=task.tenant_id,
    )


def check_move(
    table: dict[Any, frozenset[Any]], kind: str, subject_id: str, current: Any, to: Any
) -> None:
    """Raise ``InvalidTransition`` unless ``table`` allows ``current -> to``."""
    if to not in table[current]:
        raise InvalidTransition(f"{kind} {subject_id}: {current} -> {to} is not allowed")


def moved(
    session: Session,
    kind: str,
    subject_id: str,
    current: str,
    to: str,
    reason: str,
    now: datetime,
    *,
    pool: str | None = None,
    tenant_id: str | None = None,
) -> None:
    """A move made by a Core statement on the hot path (``leasing``'s warm lease).

    The statement holds the row at ``current`` in its ``WHERE``, so the database made
    exactly this move; this checks it against the table (a forbidden one raises, and
    the caller's transaction rolls back) and writes its audit row as the ORM moves do.
    """
    table = _TABLES[kind]
    check_move(table, kind, subject_id, current, to)
    _audit(session, now, kind, subject_id, reason, current, to, pool=pool, tenant_id=tenant_id)


def record(
    session: Session,
    kind: str,
    subject_id: str,
    reason: str,
    now: datetime,
    pool: str | None = None,
    tenant_id: str | None = None,
    to_state: str | None = None,
) -> None:
    """An audit event that is not a transition (lease requested, tenant created, pool patched)."""
    _audit(session, now, kind, subject_id, reason, None, to_state, pool=pool, tenant_id=tenant_id)


# ---- the audit log -----------------------------------------------------------------
#
# Events are rows, not ORM objects: building an object per event and flushing each
# with its own INSERT ... RETURNING was a fifth of a warm lease's CPU. They are kept
# on the session and written in one INSERT at the next flush, query or commit of the
# same transaction, and dropped with it on rollback.

_PENDING_EVENTS = "workerlease_pending_events"


def _audit(
    session: Session,
    now: datetime,
    kind: str,
    subject_id: str,
    reason: str,
    from_state: str | None,
    to_state: str | None,
    *,
    pool: str | None = None,
    tenant_id: str | None = None,
) -> None:
    row = {
        "at": now,
        "kind": kind,
        "subject_id": subject_id,
        "from_state": None if from_state is None else str(from_state),
        "to_state": None if to_state is None else str(to_state),
        "reason": reason,
        "pool": pool,
        "tenant_id": tenant_id,
    }
    session.info.setdefault(_PENDING_EVENTS, []).append(row)


# One ``executemany`` on the driver (``insert(Event)`` with rows would take the ORM's
# bulk path; Core's took more CPU than the database): every lease writes two or three.
_EVENT_COLUMNS = (
    "at",
    "kind",
    "subject_id",
    "from_state",
    "to_state",
    "reason",
    "pool",
    "tenant_id",
)
_INSERT_EVENTS = DriverStatement(
    insert(Event.__table__).values({name: bindparam(name) for name in _EVENT_COLUMNS})  # type: ignore[attr-defined]
)


def _write_events(session: Session, *_args: Any) -> None:
    rows = session.info.pop(_PENDING_EVENTS, None)
    if rows:
        _INSERT_EVENTS.run_many(transaction_connection(session), rows)


def _drop_events(session: Session, *_args: Any) -> None:
    session.info.pop(_PENDING_EVENTS, None)


def _write_events_before_query(state: ORMExecuteState) -> None:
    if _PENDING_EVENTS in state.session.info:
        _write_events(state.session)  # type: ignore[arg-type]


event.listen(Session, "before_flush", _write_events)
event.listen(Session, "before_commit", _write_events)
event.listen(Session, "do_orm_execute", _write_events_before_query)
event.listen(Session, "after_soft_rollback", _drop_events)
