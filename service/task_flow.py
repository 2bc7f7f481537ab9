"""Task requests that wait or wake someone up: the agent's long poll, a tenant following a
log, and the writes that end those waits (a task submitted or cancelled, output stored).

Each domain step (``service.tasks``) is one transaction; waiting holds none. Views
call one method here. Waking is in-process first (``Waiters.notify``) and, for
changes made by another process, one re-read per process every 0.5 s.
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from service import metrics, tasks
from service.clock import Clock
from service.db import read_scope, session_scope, transaction
from service.models import LIVE_TASK_STATES, Task, TaskState
from service.schemas import TaskCreate
from service.tasks import LogReceipt, LogSlice, Work
from service.waiters import Waiters, WaitMetrics
from service.wakes import NoRelay, Relay
from service.workers import check_worker_token

# An idle poll is answered after ``wait_seconds`` less up to this share of it, at random:
# agents that started together (a pool filled at once, a service restart) would otherwise
# all ask again at the same moment every ``wait_seconds``, a burst of looks that every
# other request queues behind.
POLL_JITTER = 0.2
# An agent holds one poll; a second covers a retry while the first is still being answered.
POLLS_PER_WORKER = 2


def _wait_metrics(kind: str) -> WaitMetrics:
    return WaitMetrics(
        metrics.WAITERS.labels(kind),
        metrics.WAITERS_REFUSED.labels(kind),
        metrics.WAITERS_POLL_ERRORS.labels(kind),
    )


def _log_key(task_id: str, offset: int) -> str:
    return f"{task_id}@{offset}"


@dataclass
class TaskFlow:
    read_factory: sessionmaker[Session]
    clock: Clock
    log_limit: int
    max_waits_per_tenant: int = 16
    relay: Relay = field(default_factory=NoRelay)
    polls: Waiters = field(init=False)
    follows: Waiters = field(init=False)

    def __post_init__(self) -> None:
        self.polls = Waiters(
            self._workers_with_work,
            per_owner=POLLS_PER_WORKER,
            what="polls of one worker",
            wait_metrics=_wait_metrics("poll"),
            relay=self.relay,
            topic="poll",
        )
        self.follows = Waiters(
            self._logs_moved,
            per_owner=self.max_waits_per_tenant,
            what="log reads of one tenant",
            wait_metrics=_wait_metrics("log"),
            relay=self.relay,
            topic="log",
        )

    # ---- tenants ------------------------------------------------------------------

    def submit(self, session: Session, tenant_id: str, lease_id: str, body: TaskCreate) -> Task:
        with transaction(session):
            task = tasks.submit(session, tenant_id, lease_id, body, self.clock.now())
        self.polls.notify([task.worker_id])
        return task

    def lease_tasks(
        self, session: Session, tenant_id: str, lease_id: str, limit: int, offset: int
    ) -> Sequence[Task]:
        with transaction(session):
            return tasks.lease_tasks(session, tenant_id, lease_id, limit, offset)

    def task(self, session: Session, tenant_id: str, lease_id: str, task_id: str) -> Task:
        with transaction(session):
            return tasks.tenant_task(session, tenant_id, lease_id, task_id)

    def cancel(
        self, session: Session, tenant_id: str, lease_id: str, task_id: str
    ) -> tuple[Task, bool]:
        with transaction(session):
            task, live = tasks.cancel(session, tenant_id, lease_id, task_id, self.clock.now())
        self.polls.notify([task.worker_id])
        self.follows.notify_prefix(_log_key(task.id, 0)[:-1])
        return task, live

    def cancel_by_operator(self, session: Session, task_id: str) -> tuple[Task, bool]:
        with transaction(session):
            task, live = tasks.cancel_by_operator(session, task_id, self.clock.now())
        self.polls.notify([task.worker_id])
        self.follows.notify_prefix(_log_key(task.id, 0)[:-1])
        return task, live

    def read_log(
        self,
        session: Session,
        tenant_id: str,
        lease_id: str,
        task_id: str,
        offset: int,
        wait_seconds: int,
    ) -> LogSlice:
        """Output from ``offset``; with nothing there yet and the task live, wait for more."""
        key = _log_key(task_id, offset)
        with self.follows.slot(tenant_id) if wait_seconds else nullcontext():
            with self.follows.watch(key) as moved:
                now = self._read(session, tenant_id, lease_id, task_id, offset)
                if now.data or now.state not in LIVE_TASK_STATES or not wait_seconds:
                    return now
                moved.wait(wait_seconds)
                # Woken by a chunk stored at this very offset (in this process): it is the
                # answer, committed, and this request already read the task as the
                # tenant's. Anything else (a chunk elsewhere, an ending, another
                # process's write, the timeout) reads again.
                handed = self.follows.handed(key)
            if isinstance(handed, LogSlice):
                return handed
            return self._read(session, tenant_id, lease_id, task_id, offset)

    def _read(
        self, session: Session, tenant_id: str, lease_id: str, task_id: str, offset: int
    ) -> LogSlice:
        with transaction(session):
            return tasks.read_log(session.connection(), tenant_id, lease_id, task_id, offset)

    def _logs_moved(self, keys: Collection[str]) -> set[str]:
        wanted = [(key, *key.rsplit("@", 1)) for key in keys]
        with session_scope(self.read_factory) as session:
            statement = select(Task.id, Task.log_bytes, Task.state).where(
                col(Task.id).in_({task_id for _, task_id, _ in wanted})
            )
            rows = {task_id: (size, state) for task_id, size, state in session.exec(statement)}
        moved = set()
        for key, task_id, offset in wanted:
            size, state = rows.get(task_id, (0, "gone"))
            if size > int(offset) or state not in LIVE_TASK_STATES:
                moved.add(key)
        return moved

    # ---- agents -------------------------------------------------------------------

    def poll(
        self, session: Session, worker_id: str, running: Collection[str], wait_seconds: int
    ) -> Work:
        """The worker's next tasks and cancels; with none, wait up to ``wait_seconds``.

        The look is a read, so thousands of idle agents polling write nothing; only a
        poll that starts or ends a task takes a write transaction.
        """
        with self.polls.slot(worker_id):
            deadline = time.monotonic() + wait_seconds * (1 - POLL_JITTER * random.random())
            with self.polls.watch(worker_id) as changed:
                while True:
                    changed.clear()
                    work = self._look_and_take(session, worker_id, running)
                    remaining = deadline - time.monotonic()
                    if work or remaining <= 0 or self.polls.draining:
                        return work
                    if not changed.wait(remaining):
                        # Nothing came: no last look, the agent asks again at once (and a
                        # change elsewhere in the last recheck interval is seen then).
                        return work

    def _look_and_take(self, session: Session, worker_id: str, running: Collection[str]) -> Work:
        with read_scope(self.read_factory) as reading:
            if not tasks.has_work(reading, worker_id, running):
                return Work()
        with transaction(session):
            return tasks.poll(session, worker_id, running, self.clock.now())

    def _workers_with_work(self, worker_ids: Collection[str]) -> set[str]:
        with session_scope(self.read_factory) as session:
            return tasks.workers_with_work(session, worker_ids)

    def append_log(
        self, session: Session, worker_id: str, task_id: str, offset: int, data: bytes
    ) -> LogReceipt:
        with transaction(session):
            receipt = tasks.append_log(session, worker_id, task_id, offset, data, self.log_limit)
        if receipt.stored:
            chunk = receipt.stored[: tasks.MAX_LOG_READ]
            slice_ = LogSlice(chunk, receipt.stored_at + len(chunk), TaskState.RUNNING)
            self.follows.hand(_log_key(task_id, receipt.stored_at), slice_)
        self.follows.notify_prefix(_log_key(task_id, 0)[:-1])
        return receipt

    def finish(
        self,
        session: Session,
        worker_id: str,
        task_id: str,
        outcome: str,
        exit_code: int | None,
        error: str | None,
        log_bytes: int,
    ) -> Task:
        with transaction(session):
            task = tasks.finish(
                session, worker_id, task_id, outcome, exit_code, error, log_bytes, self.clock.now()
            )
        self.follows.notify_prefix(_log_key(task_id, 0)[:-1])
        self.polls.notify([worker_id])  # a slot is free: the next queued task can start
        return task

    def authenticate_worker(self, worker_id: str, token: str) -> None:
        """Checked on a read connection of its own: a poll must not hold a write
        transaction (on SQLite, the database's write lock) while it waits."""
        with read_scope(self.read_factory) as connection:
            check_worker_token(connection, worker_id, token)
