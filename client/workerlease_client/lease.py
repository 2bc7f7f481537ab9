"""``Lease`` (a context manager renewed in the background) and ``Task``."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING

from workerlease_client.errors import (
    Conflict,
    LeaseEnded,
    NotFound,
    WaitTimeout,
    WorkerleaseError,
)
from workerlease_client.models import TASK_END_STATES, LeaseInfo, Result, TaskInfo, Worker

if TYPE_CHECKING:
    from workerlease_client.client import Client, Files, OnWait

log = logging.getLogger("workerlease_client")

# A renew goes out when half of the time left before the idle deadline has passed,
# and never sooner than this after the previous one.
MIN_RENEW_INTERVAL_S = 0.5
# The ``Date`` header has whole seconds: the service's clock may be up to 1 s later.
DATE_RESOLUTION = timedelta(seconds=1)
# How long stopping the renewer waits for a renew in flight.
STOP_JOIN_S = 1.0


class Lease:
    """A lease of one worker. Entering the ``with`` block acquires it (unless it was
    attached by id) and starts renewing it before its idle deadline; leaving the block
    stops renewing and releases it, also on an exception or Ctrl-C."""

    def __init__(
        self,
        client: Client,
        pool: str | None,
        *,
        lease_id: str | None = None,
        wait: float = 0,
        renew: bool = True,
        on_wait: OnWait | None = None,
        poll: int = 60,
    ) -> None:
        self.client = client
        self.pool = pool
        self._id = lease_id
        self._wait = wait
        self._renew = renew
        self._on_wait = on_wait
        self._poll = poll
        self._info: LeaseInfo | None = None
        self._renewer: _Renewer | None = None
        # Set by the renewer when the service says the lease has ended.
        self.ended: WorkerleaseError | None = None

    @property
    def info(self) -> LeaseInfo:
        if self._info is None:
            raise WorkerleaseError("the lease is not acquired yet", title="Not acquired")
        return self._info

    @property
    def id(self) -> str:
        if self._id is None:
            raise WorkerleaseError("the lease is not acquired yet", title="Not acquired")
        return self._id

    @property
    def worker(self) -> Worker | None:
        return self.info.worker

    def __repr__(self) -> str:
        state = self._info.state if self._info else "not acquired"
        return f"<Lease {self._id or self.pool} {state}>"

    def acquire(self) -> Lease:
        """Acquire (waiting up to ``wait``), or load the attached lease; start renewing."""
        if self._id is None:
            assert self.pool is not None
            self._info = self.client.acquire(
                self.pool, self._wait, on_wait=self._on_wait, poll=self._poll
            )
            self._id = self._info.id
        else:
            self._info = self.client.get_lease(self._id)
            if self._info.state != "active":
                raise LeaseEnded(f"lease {self._id} is {self._info.state}")
        if self._renew:
            self._renewer = _Renewer(self)
            self._renewer.start()
        return self

    def refresh(self) -> LeaseInfo:
        self._info = self.client.get_lease(self.id)
        return self._info

    def renew(self) -> LeaseInfo:
        self._info = self.client.renew_lease(self.id)
        return self._info

    def release(self, *, cleanup: bool = False) -> LeaseInfo:
        """Stop renewing and release (safe to call twice). ``cleanup``: after an
        interrupt, on a fresh connection with a short retry budget."""
        self.detach()
        self._info = self.client.release_lease(self.id, cleanup=cleanup)
        return self._info

    def detach(self) -> None:
        """Stop renewing and leave the lease as it is (it expires when idle)."""
        if self._renewer is not None:
            self._renewer.stop()
            self._renewer = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._id is None:
            return
        try:
            self.release(cleanup=exc is not None)
        except WorkerleaseError:
            if exc is None:
                raise
            # Do not hide the error that left the block behind this one.
            log.warning("release_failed lease=%s", self._id, exc_info=True)

    def submit(
        self,
        script: str,
        *,
        image: str | None = None,
        files: Files | None = None,
        env: Mapping[str, str] | None = None,
        timeout: int | None = None,
        shell: str | None = None,
    ) -> Task:
        """Start ``script`` on the worker; the task runs on while this returns."""
        info = self.client.submit_task(
            self.id, script, image=image, files=files, env=env, timeout=timeout, shell=shell
        )
        return Task(self.client, info)

    def run(
        self,
        script: str,
        image: str | None = None,
        files: Files | None = None,
        env: Mapping[str, str] | None = None,
        timeout: int | None = None,
        shell: str | None = None,
        on_output: Callable[[str], None] | None = None,
    ) -> Result:
        """Run ``script`` to its end and return its exit code, state and whole log.
        ``on_output`` is called with each piece of output as it comes. Interrupted
        (an exception, Ctrl-C), the task is cancelled before the error goes on."""
        task = self.submit(script, image=image, files=files, env=env, timeout=timeout, shell=shell)
        return task.result(on_output=on_output)

    def tasks(self) -> list[TaskInfo]:
        return self.client.tasks(self.id)

    def task(self, task_id: str) -> Task:
        return Task(self.client, self.client.get_task(self.id, task_id))


class Task:
    """A task of a lease, as last seen in ``info``."""

    def __init__(self, client: Client, info: TaskInfo) -> None:
        self.client = client
        self.info = info

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def lease_id(self) -> str:
        return self.info.lease_id

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.info.state}>"

    def refresh(self) -> TaskInfo:
        self.info = self.client.get_task(self.lease_id, self.id)
        return self.info

    def cancel(self, *, cleanup: bool = False) -> TaskInfo:
        """Ask for the task to be killed. ``cleanup``: after an interrupt, on a fresh
        connection with a short retry budget."""
        self.info = self.client.cancel_task(self.lease_id, self.id, cleanup=cleanup)
        return self.info

    def log(self, offset: int = 0, *, follow: bool = True) -> Iterator[str]:
        """The output as text chunks from byte ``offset``: as it comes until the task
        ends (``follow``), or what there is now."""
        return self.client.follow_log(self.lease_id, self.id, offset, follow=follow)

    def wait(self, timeout: float | None = None) -> TaskInfo:
        """Wait for the end (following the log, the service's long poll); ``WaitTimeout``
        after ``timeout`` seconds (the task runs on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        offset = 0
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WaitTimeout(f"task {self.id} still {self.info.state} after {timeout:g} s")
            step = 30 if left is None else max(1, min(30, int(left)))
            chunk = self.client.read_log(self.lease_id, self.id, offset, step)
            offset = chunk.next_offset
            if not chunk.data and chunk.state in TASK_END_STATES:
                return self.refresh()

    def result(self, on_output: Callable[[str], None] | None = None) -> Result:
        """Follow the output to the end; cancel the task if that is interrupted."""
        parts: list[str] = []
        try:
            for text in self.log():
                parts.append(text)
                if on_output is not None:
                    on_output(text)
            info = self.refresh()
        except BaseException:
            with contextlib.suppress(WorkerleaseError):
                self.cancel(cleanup=True)
            raise
        return Result(exit_code=info.exit_code, state=info.state, log="".join(parts), task=info)


class _Renewer:
    """Renews a lease from a daemon thread before its idle deadline, until stopped or
    the service says the lease ended (then ``lease.ended`` holds that error)."""

    def __init__(self, lease: Lease) -> None:
        self._lease = lease
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"workerlease-renew-{lease.id}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing. A renew already in flight is not waited for beyond
        ``STOP_JOIN_S``: the release may overtake it, and it then meets the ended lease
        (409) and the thread ends; after Ctrl-C nobody should wait out its retries."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=STOP_JOIN_S)

    def _run(self) -> None:
        lease = self._lease
        delay = renew_delay(lease.info)
        while not self._stop.wait(delay):
            try:
                info = lease.renew()
            except Exception as exc:
                if self._stop.is_set():
                    # Stopped while this renew was in flight: the release overtook it, or
                    # Ctrl-C closed the client under it (httpx then raises RuntimeError).
                    # Nobody waits for this thread; it ends quietly.
                    log.debug("renew_abandoned lease=%s error=%r", lease.id, exc)
                    return
                if isinstance(exc, (Conflict, NotFound)):
                    lease.ended = exc
                    log.warning("lease_ended lease=%s detail=%s", lease.id, exc.detail)
                    return
                if not isinstance(exc, WorkerleaseError):
                    raise
                # The transport has already retried what may be retried; try again soon,
                # the deadline itself has not moved.
                log.warning("renew_failed lease=%s error=%s", lease.id, exc)
                delay = renew_delay(lease.info)
                continue
            delay = renew_delay(info)


def renew_delay(info: LeaseInfo, now: datetime | None = None) -> float:
    """Seconds until the next renew: half the time left before the idle deadline, on
    whichever clock (ours, or the service's from its ``Date`` header) leaves less."""
    if info.idle_expires_at is None:
        return MIN_RENEW_INTERVAL_S * 10
    deadline = _aware(info.idle_expires_at)
    now = now or datetime.now(UTC)
    left = (deadline - now).total_seconds()
    if info.server_time is not None and info.received_at is not None:
        server_now = _aware(info.server_time) + (now - info.received_at) + DATE_RESOLUTION
        left = min(left, (deadline - server_now).total_seconds())
    return max(MIN_RENEW_INTERVAL_S, left / 2)


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
