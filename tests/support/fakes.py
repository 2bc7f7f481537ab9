"""A strict in-memory provisioner double and a settable clock, for unit and API tests.

``FakeCloud`` is the "platform": it holds resources by worker id, records every
call, and fails loudly on misuse (a destroy of something never created is fine,
as the contract says; a create with a different spec for the same id is not).
Tests make failures happen with ``fail_next``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from provisioners.base import (
    Provisioner,
    ProvisionerOptions,
    ResourceState,
    TransientProvisionerError,
    WorkerHandle,
    WorkerSpec,
)
from tests.support.entry_points import install_distribution


class FakeOptions(ProvisionerOptions):
    flavour: str = "standard"
    warning: str | None = None  # what the provisioner tells operators (see Provisioner.warning)


@dataclass
class FakeResource:
    spec: WorkerSpec
    state: ResourceState = ResourceState.RUNNING
    destroyed: bool = False


@dataclass
class FakeCloud:
    resources: dict[str, FakeResource] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    fail_next: dict[str, list[Exception]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def live(self) -> dict[str, FakeResource]:
        return {k: r for k, r in self.resources.items() if not r.destroyed}

    def live_ids(self, deployment_id: str | None = None) -> set[str]:
        return {
            k
            for k, r in self.live().items()
            if deployment_id is None or r.spec.deployment_id == deployment_id
        }

    def inject(self, operation: str, *errors: Exception) -> None:
        self.fail_next.setdefault(operation, []).extend(errors)

    def _maybe_fail(self, operation: str) -> None:
        queue = self.fail_next.get(operation)
        if queue:
            raise queue.pop(0)

    def vanish(self, worker_id: str) -> None:
        """The machine disappears behind the service's back."""
        self.resources[worker_id].state = ResourceState.GONE


CLOUD = FakeCloud()


class FakeProvisioner(Provisioner[FakeOptions]):
    name = "fake"
    Options = FakeOptions

    def create(self, spec: WorkerSpec) -> WorkerHandle:
        with CLOUD.lock:
            CLOUD.calls.append(("create", spec.worker_id))
            CLOUD._maybe_fail("create")
            existing = CLOUD.resources.get(spec.worker_id)
            if existing is not None and not existing.destroyed:
                assert existing.spec == spec, "create called twice with different specs"
            else:
                CLOUD.resources[spec.worker_id] = FakeResource(spec)
            return WorkerHandle(spec.worker_id, spec.pool, f"fake-{spec.worker_id}", "127.0.0.1")

    def destroy(self, handle: WorkerHandle) -> None:
        with CLOUD.lock:
            CLOUD.calls.append(("destroy", handle.worker_id))
            CLOUD._maybe_fail("destroy")
            resource = CLOUD.resources.get(handle.worker_id)
            if resource is not None:
                resource.destroyed = True

    @property
    def warning(self) -> str | None:
        return self.options.warning

    def describe(self, handles: Iterable[WorkerHandle]) -> dict[str, ResourceState]:
        with CLOUD.lock:
            result = {}
            for handle in handles:
                resource = CLOUD.resources.get(handle.worker_id)
                result[handle.worker_id] = (
                    ResourceState.GONE if resource is None or resource.destroyed else resource.state
                )
            return result

    def list_owned(self, deployment_id: str) -> list[WorkerHandle]:
        with CLOUD.lock:
            return [
                WorkerHandle(
                    k, r.spec.pool, f"fake-{k}", installation=r.spec.installation_id or None
                )
                for k, r in CLOUD.live().items()
                if r.spec.deployment_id == deployment_id
            ]


def install() -> FakeCloud:
    """Register ``fake`` (an entry point, as a third-party package would) and start from
    an empty cloud."""
    install_distribution()
    CLOUD.resources.clear()
    CLOUD.calls.clear()
    CLOUD.fail_next.clear()
    return CLOUD


class ManualClock:
    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, **delta: float) -> datetime:
        self._now += timedelta(**delta)
        return self._now


__all__ = [
    "CLOUD",
    "FakeCloud",
    "FakeProvisioner",
    "ManualClock",
    "TransientProvisionerError",
    "install",
]
