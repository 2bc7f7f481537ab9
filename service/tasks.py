"""Tasks: steps a tenant runs on its lease's worker, handed to the worker's agent when it polls.

Every function here runs inside the caller's transaction (``session``) and takes
``now`` from the caller's clock (``task_flow`` wakes whoever waits). The state
machine is ``states.TASK_TRANSITIONS``; ending a task goes through :func:`end_task`,
which erases what may hold secrets (script, env, files) and restarts the lease's
idle clock when it was the lease's last live task. The protocol is docs/tasks.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from sqlalchemy import Table, and_, bindparam, delete, func, insert, literal_column, or_, update
from sqlalchemy import select as core_select
from sqlalchemy.engine import Connection
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from service import metrics
from service.db import Prepared, core_connection, is_sqlite, with_row_locks
from service.driver_sql import DriverStatement
from service.errors import Conflict, InvalidRequest, NotFound, RangeNotSatisfiable
from service.models import (
    LIVE_TASK_STATES,
    EndReason,
    Event,
    Lease,
    LeaseState,
    Pool,
    Task,
    TaskLogChunk,
    TaskState,
)
from service.security import new_id
from service.states import move_task, record

if TYPE_CHECKING:  # an annotation only: `simulate` starts without the API models (~0.2 s)
    from service.schemas import TaskCreate

EXECUTION_CONTAINERS = "execution-containers"
# A running task whose cancel the agent has not confirmed in this long is ended anyway.
CANCEL_CONFIRM_S = 30
# A running task with no result this long after its timeout is lost (its agent is gone).
RESULT_GRACE_S = 120
MAX_LOG_READ = 1 << 20  # bytes answered per log read; the caller continues at X-Next-Offset
PURGE_BATCH = 500


def default_shell(pool_os: str) -> str:
    return "powershell" if pool_os == "windows" else "sh"


def is_ended(task: Task) -> bool:
    return task.state not in LIVE_TASK_STATES


# The hot path in Core (issue 11): a followed log costs an output chunk and a log read
# per line, and every idle agent's poll looks; none of them builds ORM instances.
_T: Table = Task.__table__  # type: ignore[attr-defined]
_C: Table = TaskLogChunk.__table__  # type: ignore[attr-defined]
_P: Table = Pool.__table__  # type: ignore[attr-defined]
_LIVE: list[Any] = [literal_column(f"'{state}'") for state in LIVE_TASK_STATES]

_LARGEST_OFFSET = (1 << 31) - 1  # log_bytes and a chunk's offset are INTEGER columns
# The tenant's task (no row: not theirs) and, when the log goes past ``b_offset``, the
# chunks holding [b_offset, b_end): from the last one starting at or before b_offset.
_FIRST_CHUNK = (
    core_select(func.coalesce(func.max(_C.c.offset), 0))
    .where(_C.c.task_id == bindparam("b_task_id"), _C.c.offset <= bindparam("b_offset"))
    .scalar_subquery()
)
_LOG_READ = (
    core_select(_T.c.state, _T.c.log_bytes, _C.c.offset, _C.c.data)
    .select_from(
        _T.outerjoin(
            _C,
            and_(
                _C.c.task_id == _T.c.id,
                _T.c.log_bytes > bindparam("b_offset"),
                _C.c.offset >= _FIRST_CHUNK,
                _C.c.offset < bindparam("b_end"),
            ),
        )
    )
    .where(
        _T.c.id == bindparam("b_task_id"),
        _T.c.lease_id == bindparam("b_lease_id"),
        _T.c.tenant_id == bindparam("b_tenant_id"),
    )
    .order_by(_C.c.offset)
)
# The worker's live tasks and its pool's max_concurrent_tasks: a poll's look.
_LIVE_TASK_LOOK = (
    core_select(
        _T.c.id,
        _T.c.state,
        _T.c.cancel_requested_at,
        func.coalesce(
            core_select(_P.c.max_concurrent_tasks).where(_P.c.name == _T.c.pool).scalar_subquery(),
            1,
        ).label("max_concurrent_tasks"),
    )
    .where(_T.c.worker_id == bindparam("b_worker_id"), _T.c.state.in_(_LIVE))
    .order_by(_T.c.seq)
)
_LIVE_TASKS = Prepared(
    select(Task)
    .where(Task.worker_id == bindparam("b_worker_id"), col(Task.state).in_(_LIVE))
    .order_by(col(Task.seq)),
    skip_locked=False,
)
# What storing a chunk of output reads of its task, and writes.
_OUTPUT_LOOK = Prepared(
    core_select(
        _T.c.state,
        _T.c.received_bytes,
        _T.c.log_bytes,
        _T.c.log_capped,
        _T.c.cancel_requested_at,
        _T.c.pool,
    ).where(_T.c.id == bindparam("b_task_id"), _T.c.worker_id == bindparam("b_worker_id")),
    skip_locked=False,
)
_INSERT_CHUNK = insert(_C)
_STORE_OUTPUT = (
    update(_T)
    .where(_T.c.id == bindparam("b_task_id"))
    .values(
        received_bytes=bindparam("b_received"),
        log_bytes=bindparam("b_log_bytes"),
        log_capped=bindparam("b_capped"),
    )
)


# ---- the tenant's side -------------------------------------------------------------


def submit(
    session: Session, tenant_id: str, lease_id: str, request: TaskCreate, now: datetime
) -> Task:
    """Queue a task on the worker of the tenant's active lease (409 when not active)."""
    lease = _tenant_lease(session, tenant_id, lease_id, lock=True)
    if lease.state != LeaseState.ACTIVE or lease.worker_id is None:
        raise Conflict(f"lease {lease_id} is {lease.state}; tasks run on active leases only")
    pool = session.get(Pool, lease.pool)
    assert pool is not None
    if request.container is not None and EXECUTION_CONTAINERS not in pool.capabilities:
        raise InvalidRequest(
            f"pool {pool.name!r} cannot run execution containers (its capabilities do not "
            f"include {EXECUTION_CONTAINERS!r}); leave out 'container'"
        )
    shell = request.shell or default_shell(pool.os)
    # Under the lease's row lock (PostgreSQL) or the write lock (SQLite): no two tasks of
    # one lease get the same number, and the unique index would say so if they did.
    seq = session.exec(select(func.count()).where(Task.lease_id == lease.id)).one() + 1
    digest = hashlib.sha256(request.script.encode()).hexdigest()
    task = Task(
        id=new_id("t"),
        lease_id=lease.id,
        seq=seq,
        tenant_id=tenant_id,
        pool=lease.pool,
        worker_id=lease.worker_id,
        state=TaskState.QUEUED,
        shell=shell,
        timeout_s=request.timeout_s,
        container_image=request.container.image if request.container else None,
        created_at=now,
        payload=json.dumps({"script": request.script, "env": request.env, "files": request.files}),
        script_sha256=digest,
    )
    session.add(task)
    image = f" in {task.container_image}" if task.container_image else ""
    record(
        session,
        "task",
        task.id,
        f"submitted on lease {lease.id} for worker {lease.worker_id}: {shell} script "
        f"sha256:{digest[:16]} ({len(request.script.encode())} bytes){image}, "
        f"{len(request.env)} env vars, {len(request.files)} files",
        now,
        pool=task.pool,
        tenant_id=tenant_id,
        to_state=TaskState.QUEUED,
    )
    return task


def lease_tasks(
    session: Session, tenant_id: str, lease_id: str, limit: int = 100, offset: int = 0
) -> Sequence[Task]:
    """The tenant's lease's tasks, oldest first, a page of ``limit`` from ``offset`` (404
    for a lease that is not theirs). ``uq_tasks_lease_seq`` serves the order."""
    _tenant_lease(session, tenant_id, lease_id)
    statement = (
        select(Task)
        .where(Task.lease_id == lease_id)
        .order_by(col(Task.seq))
        .offset(offset)
        .limit(limit)
    )
    return session.exec(statement).all()


def tenant_task(
    session: Session, tenant_id: str, lease_id: str, task_id: str, *, lock: bool = False
) -> Task:
    """The tenant's task, or 404 (another tenant's task is never revealed)."""
    statement = select(Task).where(
        Task.id == task_id, Task.lease_id == lease_id, Task.tenant_id == tenant_id
    )
    return _first_or_404(session, statement, lock, f"no task {task_id!r} on lease {lease_id!r}")


def cancel(
    session: Session, tenant_id: str, lease_id: str, task_id: str, now: datetime
) -> tuple[Task, bool]:
    """The tenant cancels its task: a queued one ends now, a running one is killed by its
    agent. Returns the task and whether it was still live (an ended one is left as is)."""
    task = locked(session, tenant_task(session, tenant_id, lease_id, task_id))
    return task, _cancel(session, task, TENANT, now)


def cancel_by_operator(session: Session, task_id: str, now: datetime) -> tuple[Task, bool]:
    """An operator cancels any tenant's task (the dashboard); audited as theirs."""
    task = session.get(Task, task_id)
    if task is None:
        raise NotFound(f"no task {task_id!r}")
    task = locked(session, task)
    return task, _cancel(session, task, OPERATOR, now)


TENANT = "the tenant"
OPERATOR = "an operator"


def _cancel(session: Session, task: Task, by: str, now: datetime) -> bool:
    if task.state == TaskState.QUEUED:
        end_task(session, task, TaskState.CANCELLED, now, error=f"cancelled by {by}")
        return True
    if task.state != TaskState.RUNNING:
        return False
    if task.cancel_requested_at is None:
        task.cancel_requested_at = now
        session.add(task)
        record(
            session,
            "task",
            task.id,
            f"cancel requested by {by}",
            now,
            pool=task.pool,
            tenant_id=task.tenant_id,
        )
    return True


def _cancelled_by(session: Session, task: Task) -> str:
    """Who asked for the cancel, from the audit log (only read when a cancel ends)."""
    asked = session.exec(
        select(Event.reason)
        .where(Event.subject_id == task.id, col(Event.reason).startswith("cancel requested by "))
        .order_by(col(Event.id).desc())
        .limit(1)
    ).first()
    return asked.removeprefix("cancel requested by ") if asked else TENANT


@dataclass(frozen=True)
class LogSlice:
    data: bytes
    next_offset: int
    state: TaskState


def read_log(
    connection: Connection,
    tenant_id: str,
    lease_id: str,
    task_id: str,
    offset: int,
    limit: int = MAX_LOG_READ,
) -> LogSlice:
    """The tenant's task's kept log from byte ``offset``, at most ``limit`` bytes (404 for a
    task that is not theirs; 416 past its end when the task has ended: such an offset
    never fills). One statement: a follower reads on every line printed."""
    params = {
        "b_task_id": task_id,
        "b_lease_id": lease_id,
        "b_tenant_id": tenant_id,
        # Offsets past any log are asked as the largest the column holds: no chunk lies
        # there either, and PostgreSQL refuses an INTEGER parameter beyond it.
        "b_offset": min(offset, _LARGEST_OFFSET),
        "b_end": min(offset + limit, _LARGEST_OFFSET),
    }
    rows = connection.execute(_LOG_READ, params).all()
    if not rows:
        raise NotFound(f"no task {task_id!r} on lease {lease_id!r}")
    state, log_bytes = TaskState(rows[0].state), rows[0].log_bytes
    if offset > log_bytes and state not in LIVE_TASK_STATES:
        raise RangeNotSatisfiable(f"offset {offset} is past the end of the log ({log_bytes} bytes)")
    end = min(log_bytes, offset + limit)
    data = b""
    if end > offset and rows[0].offset is not None:
        start = rows[0].offset
        joined = b"".join(row.data for row in rows)
        data = joined[offset - start : end - start]
    return LogSlice(data, offset + len(data), state)


def _tenant_lease(session: Session, tenant_id: str, lease_id: str, lock: bool = False) -> Lease:
    statement = select(Lease).where(Lease.id == lease_id, Lease.tenant_id == tenant_id)
    return _first_or_404(session, statement, lock, f"no lease {lease_id!r}")


RowT = TypeVar("RowT")


def _first_or_404(
    session: Session, statement: SelectOfScalar[RowT], lock: bool, missing: str
) -> RowT:
    """The statement's first row (under its row lock when ``lock``), or 404."""
    if lock:
        statement = with_row_locks(statement, session, skip_locked=False)
    row = session.exec(statement).first()
    if row is None:
        raise NotFound(missing)
    return row


# ---- the agent's side --------------------------------------------------------------


@dataclass
class Work:
    """A poll's answer: tasks to start (with what they need to run) and tasks to kill."""

    tasks: list[tuple[Task, dict[str, Any]]] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.tasks or self.cancel)


def has_work(connection: Connection, worker_id: str, running: Collection[str]) -> bool:
    """Whether :func:`poll` would answer something: a read of the worker's live tasks
    (none, for an idle worker), so an idle poll writes nothing."""
    live = connection.execute(_LIVE_TASK_LOOK, {"b_worker_id": worker_id}).all()
    capacity = live[0].max_concurrent_tasks if live else 0
    return bool(_plan(live, running, capacity)) or bool(_cancelled_unstarted(live, running))


def poll(session: Session, worker_id: str, running: Collection[str], now: datetime) -> Work:
    """Start the worker's queued tasks up to its pool's ``max_concurrent_tasks``, hand out
    again what it should be running but does not list, and name what it must kill."""
    _lock_lease(session, select(Lease.id).where(Lease.worker_id == worker_id))
    live = _live_tasks(session, worker_id, lock=True)
    capacity = _max_concurrent_tasks(session, live[0].pool) if live else 0
    planned = _plan(live, running, capacity)
    work = Work([(task, _payload(task)) for task in planned.start], planned.cancel)
    for task in planned.start:
        if task.state == TaskState.QUEUED:
            task.started_at = now
            move_task(session, task, TaskState.RUNNING, f"started on worker {worker_id}", now)
            metrics.TASK_DISPATCH.labels(task.pool).observe((now - task.created_at).total_seconds())
    for task in _cancelled_unstarted(live, running):
        error = f"cancelled by {_cancelled_by(session, task)}"
        end_task(session, task, TaskState.CANCELLED, now, error=error)
    return work


class _LiveTask(Protocol):
    """What planning reads of a live task: an ORM ``Task``, or a row of the idle look."""

    @property
    def id(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def cancel_requested_at(self) -> datetime | None: ...


LiveT = TypeVar("LiveT", bound=_LiveTask)


def _cancelled_unstarted(live: Sequence[LiveT], running: Collection[str]) -> list[LiveT]:
    """Cancelled while its agent did not run it (the answer handing it out was lost):
    there is nothing to kill, so it ends now."""
    return [
        task
        for task in live
        if task.state == TaskState.RUNNING
        and task.cancel_requested_at is not None
        and task.id not in running
    ]


@dataclass
class _Plan(Generic[LiveT]):
    start: list[LiveT] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.start or self.cancel)


def _plan(live: Sequence[LiveT], running: Collection[str], capacity: int) -> _Plan[LiveT]:
    """What to hand out (``start``) and what to kill (``cancel``), from the worker's live
    tasks, what its agent runs, and the pool's ``max_concurrent_tasks`` (``capacity``)."""
    by_id = {task.id: task for task in live}
    plan: _Plan[LiveT] = _Plan()
    for task_id in running:
        task = by_id.get(task_id)
        if task is None or task.state != TaskState.RUNNING or task.cancel_requested_at:
            plan.cancel.append(task_id)
    started = [task for task in live if task.state == TaskState.RUNNING]
    # Running here but not there: the answer that handed it out was lost on the way.
    resend = [t for t in started if t.id not in running and t.cancel_requested_at is None]
    queued = [task for task in live if task.state == TaskState.QUEUED]
    plan.start = resend + queued[: max(0, capacity - len(started))]
    return plan


def _max_concurrent_tasks(session: Session, pool_name: str) -> int:
    pool = session.get(Pool, pool_name)
    return pool.max_concurrent_tasks if pool is not None else 1


def _payload(task: Task) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(task.payload or "{}")
    return data


def _live_tasks(session: Session, worker_id: str, *, lock: bool) -> Sequence[Task]:
    statement = _LIVE_TASKS.for_update(session) if lock else _LIVE_TASKS.plain
    return session.exec(statement, params={"b_worker_id": worker_id}).all()


def workers_with_work(session: Session, worker_ids: Collection[str]) -> set[str]:
    """Among ``worker_ids``, those with a queued task or a cancel to deliver (one query)."""
    statement = select(Task.worker_id).where(
        col(Task.worker_id).in_(list(worker_ids)),
        or_(
            col(Task.state) == TaskState.QUEUED,
            and_(col(Task.state) == TaskState.RUNNING, col(Task.cancel_requested_at).is_not(None)),
        ),
    )
    return set(session.exec(statement).all())


def worker_task(session: Session, worker_id: str, task_id: str, *, lock: bool = False) -> Task:
    statement = select(Task).where(Task.id == task_id, Task.worker_id == worker_id)
    return _first_or_404(session, statement, lock, f"no task {task_id!r} on worker {worker_id!r}")


@dataclass(frozen=True)
class LogReceipt:
    received: int
    cancel: bool
    discard: bool
    stored_at: int = 0  # where ``stored`` begins in the kept log
    stored: bytes = b""  # what this chunk added to the kept log


def append_log(
    session: Session,
    worker_id: str,
    task_id: str,
    offset: int,
    data: bytes,
    log_limit: int,
) -> LogReceipt:
    """Store the part of a chunk of the agent's output stream not stored yet.

    ``offset`` is the chunk's place in the agent's stream: bytes before
    ``received_bytes`` are a retry's duplicates, a chunk after a gap is not stored
    (the agent sends again from ``received``). The kept log stops at ``log_limit``
    with one marker line; the stream is still counted, so the agent can finish.
    In Core under the task's row lock: a followed log sends a chunk per line or two.
    """
    connection = session.connection()
    params = {"b_task_id": task_id, "b_worker_id": worker_id}
    task = connection.execute(_OUTPUT_LOOK.for_update(session), params).first()
    if task is None:
        raise NotFound(f"no task {task_id!r} on worker {worker_id!r}")
    running = task.state == TaskState.RUNNING
    received, capped = task.received_bytes, task.log_capped
    fresh = data[received - offset :] if running and offset <= received else b""
    kept = b""
    if fresh:
        received += len(fresh)
        kept = fresh[: max(0, log_limit - task.log_bytes)]
        if not capped and len(kept) < len(fresh):
            kept += f"\n[workerlease: output beyond {log_limit} bytes was dropped]\n".encode()
            capped = True
        if kept:
            connection.execute(
                _INSERT_CHUNK, {"task_id": task_id, "offset": task.log_bytes, "data": kept}
            )
            metrics.TASK_LOG_BYTES.labels(task.pool).inc(len(kept))
        connection.execute(
            _STORE_OUTPUT,
            {
                "b_task_id": task_id,
                "b_received": received,
                "b_log_bytes": task.log_bytes + len(kept),
                "b_capped": capped,
            },
        )
    return LogReceipt(
        received=received,
        cancel=not running or task.cancel_requested_at is not None,
        discard=capped,
        stored_at=task.log_bytes,
        stored=kept,
    )


# What the agent reports -> the task's end state.
_OUTCOMES = {
    "timed_out": TaskState.TIMED_OUT,
    "cancelled": TaskState.CANCELLED,
    "failed_to_start": TaskState.FAILED,
}


def finish(
    session: Session,
    worker_id: str,
    task_id: str,
    outcome: str,
    exit_code: int | None,
    error: str | None,
    log_bytes: int,
    now: datetime,
) -> Task:
    """The agent's result. 409 (with ``received``) while output is missing, so a task
    never ends with a log shorter than what its script printed."""
    task = locked(session, worker_task(session, worker_id, task_id))
    if task.state != TaskState.RUNNING:
        return task  # ended here already (cancelled, lost): the first word stays
    if task.received_bytes < log_bytes and not task.log_capped:
        raise Conflict(
            f"the service holds {task.received_bytes} of {log_bytes} bytes of output; "
            "send the rest first",
            received=task.received_bytes,
        )
    if outcome == "exited":
        state = TaskState.SUCCEEDED if exit_code == 0 else TaskState.FAILED
    else:
        state = _OUTCOMES[outcome]
    if state == TaskState.TIMED_OUT:
        error = error or f"killed after timeout_s={task.timeout_s}"
    elif state == TaskState.CANCELLED:
        error = error or (
            f"cancelled by {_cancelled_by(session, task)}"
            if task.cancel_requested_at
            else "cancelled on the worker"
        )
    elif outcome == "failed_to_start":
        error = error or "the task could not be started"
    end_task(session, task, state, now, exit_code=exit_code, error=error)
    return task


# ---- endings ---------------------------------------------------------------------


def locked(session: Session, task: Task) -> Task:
    """``task`` re-read under its row lock, its lease's row locked first.

    Whatever ends a task may touch its lease (the idle clock), and ending a lease locks
    the lease, then its tasks: taking the locks in that one order everywhere means two
    transactions never wait on each other in a circle (PostgreSQL; SQLite has one
    writer at a time anyway)."""
    if is_sqlite(session):
        return task
    _lock_lease(session, select(Lease.id).where(Lease.id == task.lease_id))
    statement = (
        select(Task)
        .where(Task.id == task.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return session.exec(statement).one()


def _lock_lease(session: Session, statement: Any) -> None:
    if not is_sqlite(session):
        session.exec(statement.with_for_update()).first()


def end_task(
    session: Session,
    task: Task,
    to: TaskState,
    now: datetime,
    *,
    exit_code: int | None = None,
    error: str | None = None,
    restart_idle_clock: bool = True,
) -> None:
    task.finished_at = now
    task.exit_code = exit_code
    task.error = error[:1000] if error else None
    task.payload = None  # the script, env and files may hold secrets: gone with the task
    what = f"exit code {exit_code}" if exit_code is not None else (error or str(to))
    move_task(session, task, to, f"{to} on worker {task.worker_id}: {what}"[:500], now)
    metrics.TASKS_ENDED.labels(task.pool, to).inc()
    if restart_idle_clock:
        _restart_idle_clock(session, task, now)


def _restart_idle_clock(session: Session, task: Task, now: datetime) -> None:
    """A lease is not idle while it runs tasks: its idle clock starts when the last ends."""
    lease = session.get(Lease, task.lease_id)
    if lease is None or lease.state != LeaseState.ACTIVE:
        return
    others = select(Task.id).where(
        Task.lease_id == lease.id, Task.id != task.id, col(Task.state).in_(LIVE_TASK_STATES)
    )
    if session.exec(others.limit(1)).first() is not None:
        return
    pool = session.get(Pool, lease.pool)
    assert pool is not None
    lease.idle_expires_at = now + timedelta(seconds=pool.lease_idle_timeout_s)
    session.add(lease)


def end_lease_tasks(session: Session, lease_id: str, reason: EndReason, now: datetime) -> int:
    """The lease ended: its queued tasks are cancelled, its running ones cancelled (the
    tenant or an operator ended it, or it expired) or lost (its worker failed)."""
    statement = select(Task).where(Task.lease_id == lease_id, col(Task.state).in_(LIVE_TASK_STATES))
    tasks = session.exec(with_row_locks(statement, session, skip_locked=False)).all()
    for task in tasks:
        to = TaskState.LOST if reason == EndReason.FAILED else TaskState.CANCELLED
        why = f"the lease ended ({reason}) while the task was {task.state}"
        end_task(session, task, to, now, error=why, restart_idle_clock=False)
    return len(tasks)


@dataclass(frozen=True)
class Swept:
    cancelled: int = 0
    lost: int = 0
    purged: int = 0


def sweep(session: Session, now: datetime, retention_s: int) -> Swept:
    """The backstops: end running tasks whose agent went silent, purge old ones."""
    cancelled = lost = 0
    running = select(Task).where(Task.state == TaskState.RUNNING)
    for candidate in session.exec(running).all():
        task = locked(session, candidate)
        if task.state != TaskState.RUNNING:
            continue
        asked = task.cancel_requested_at
        if asked is not None and asked <= now - timedelta(seconds=CANCEL_CONFIRM_S):
            why = (
                f"cancelled by {_cancelled_by(session, task)}; the worker did not confirm "
                f"within {CANCEL_CONFIRM_S} s"
            )
            end_task(session, task, TaskState.CANCELLED, now, error=why)
            cancelled += 1
            continue
        assert task.started_at is not None
        if task.started_at + timedelta(seconds=task.timeout_s + RESULT_GRACE_S) <= now:
            why = f"no result from worker {task.worker_id} within timeout_s + {RESULT_GRACE_S} s"
            end_task(session, task, TaskState.LOST, now, error=why)
            lost += 1
    return Swept(cancelled=cancelled, lost=lost, purged=_purge(session, now, retention_s))


# Asked before every full pass: on the driver's cursor (``DriverStatement``).
_RUNNING_DEADLINES = DriverStatement(
    core_select(_T.c.started_at, _T.c.timeout_s, _T.c.cancel_requested_at).where(
        _T.c.state == TaskState.RUNNING.value
    )
)
_OLDEST_FINISHED = DriverStatement(core_select(func.min(_T.c.finished_at).label("oldest")))


def sweep_due(session: Session, now: datetime, retention_s: int) -> bool:
    """Whether ``sweep`` would end or purge a task at ``now`` (its deadlines, read only)."""
    connection = core_connection(session)
    for started_at, timeout_s, asked in _RUNNING_DEADLINES.all(connection, {}):
        if asked is not None and asked <= now - timedelta(seconds=CANCEL_CONFIRM_S):
            return True
        if started_at is not None and (
            started_at + timedelta(seconds=timeout_s + RESULT_GRACE_S) <= now
        ):
            return True
    [(oldest,)] = _OLDEST_FINISHED.all(connection, {})  # an aggregate: one row
    return oldest is not None and oldest < now - timedelta(seconds=retention_s)


def _purge(session: Session, now: datetime, retention_s: int) -> int:
    cutoff = now - timedelta(seconds=retention_s)
    old = (
        select(Task.id)
        .where(col(Task.finished_at).is_not(None), col(Task.finished_at) < cutoff)
        .limit(PURGE_BATCH)
    )
    ids = list(session.exec(old).all())
    if ids:
        session.execute(delete(TaskLogChunk).where(col(TaskLogChunk.task_id).in_(ids)))
        session.execute(delete(Task).where(col(Task.id).in_(ids)))
    return len(ids)
