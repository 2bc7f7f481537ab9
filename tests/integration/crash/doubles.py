"""A provisioner double that fails or hangs on command (registered as ``faulty``).

Resources live in memory (``CONTROL.resources``); ``ready_when_running`` makes a
created worker ready on the next health pass, so no agent is needed. A test arms
faults per operation and pool: ``CONTROL.hang("create", "alpha")`` makes the next
create of pool alpha block until ``CONTROL.unblock()`` (at most ``HANG_MAX_S``, far
longer than any test waits: a hang never ends by itself while a test looks at it),
``CONTROL.fail("destroy", "alpha", 2)`` makes the next two destroys raise.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from provisioners.base import (
    Provisioner,
    ProvisionerOptions,
    ResourceState,
    TransientProvisionerError,
    WorkerHandle,
    WorkerSpec,
)

HANG_MAX_S = 300.0


@dataclass
class Control:
    resources: dict[str, WorkerSpec] = field(default_factory=dict)  # worker id -> spec, live
    destroyed: set[str] = field(default_factory=set)
    calls: list[tuple[float, str, str, str]] = field(default_factory=list)  # t, op, pool, id
    hangs: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    failures: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    hanging: dict[str, str] = field(default_factory=dict)  # worker id -> op, while blocked
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.resources.clear()
            self.destroyed.clear()
            self.calls.clear()
            self.hangs.clear()
            self.failures.clear()
            self.hanging.clear()
            self.release = threading.Event()

    def hang(self, op: str, pool: str, times: int = 1) -> None:
        with self.lock:
            self.hangs[(op, pool)] += times

    def fail(self, op: str, pool: str, times: int = 1) -> None:
        with self.lock:
            self.failures[(op, pool)] += times

    def unblock(self) -> None:
        self.release.set()

    def live_ids(self, deployment_id: str) -> set[str]:
        with self.lock:
            return {w for w, s in self.resources.items() if s.deployment_id == deployment_id}

    def _enter(self, op: str, pool: str, worker_id: str) -> None:
        with self.lock:
            self.calls.append((time.monotonic(), op, pool, worker_id))
            hang = self.hangs[(op, pool)] > 0
            if hang:
                self.hangs[(op, pool)] -= 1
                self.hanging[worker_id] = op
            fail = not hang and self.failures[(op, pool)] > 0
            if fail:
                self.failures[(op, pool)] -= 1
            release = self.release
        if hang:
            release.wait(HANG_MAX_S)
            with self.lock:
                self.hanging.pop(worker_id, None)
        if fail:
            raise TransientProvisionerError(f"injected {op} failure for {worker_id}")


CONTROL = Control()


class FaultyProvisioner(Provisioner):
    name = "faulty"
    Options = ProvisionerOptions

    def create(self, spec: WorkerSpec) -> WorkerHandle:
        CONTROL._enter("create", spec.pool, spec.worker_id)
        with CONTROL.lock:
            CONTROL.resources[spec.worker_id] = spec
        return WorkerHandle(spec.worker_id, spec.pool, f"faulty-{spec.worker_id}", "127.0.0.1")

    def destroy(self, handle: WorkerHandle) -> None:
        CONTROL._enter("destroy", handle.pool, handle.worker_id)
        with CONTROL.lock:
            if CONTROL.resources.pop(handle.worker_id, None) is not None:
                CONTROL.destroyed.add(handle.worker_id)

    def describe(self, handles: Iterable[WorkerHandle]) -> dict[str, ResourceState]:
        with CONTROL.lock:
            return {
                h.worker_id: ResourceState.RUNNING
                if h.worker_id in CONTROL.resources
                else ResourceState.GONE
                for h in handles
            }

    def list_owned(self, deployment_id: str) -> list[WorkerHandle]:
        with CONTROL.lock:
            return [
                WorkerHandle(w, s.pool, f"faulty-{w}")
                for w, s in CONTROL.resources.items()
                if s.deployment_id == deployment_id
            ]

    @property
    def ready_when_running(self) -> bool:
        return True


def install() -> Control:
    CONTROL.reset()
    return CONTROL
