"""``due.expiry_due``: the read-only check that lets ``maintain`` skip its expiry
transaction (and, on SQLite, the write lock) when nothing has reached a deadline."""

from __future__ import annotations

from typing import Any

import pytest

from service.db import session_scope
from service.due import expiry_due
from service.models import LeaseState
from tests.api.helpers import lease_row, request_lease
from tests.conftest import Service, pool_config


@pytest.fixture
def pools() -> list[dict[str, Any]]:
    return [
        pool_config(
            min_ready=1,
            max_workers=4,
            lease_idle_timeout="10m",
            lease_max_lifetime="1h",
            pending_timeout="5m",
            provision_timeout="3m",
        )
    ]


def _due(svc: Service) -> bool:
    with session_scope(svc.rt.read_factory) as session:
        return expiry_due(session, svc.clock.now(), svc.rt.task_retention_s)


def test_nothing_is_due_until_a_lease_reaches_its_idle_deadline(svc: Service) -> None:
    svc.warm()
    lease = request_lease(svc.client, svc.tenant()["token"]).get_json()
    svc.tick()
    svc.agents_report_ready()  # the replacement is ready: no provisioning deadline left
    assert not _due(svc)
    svc.clock.advance(minutes=9, seconds=59)
    assert not _due(svc)
    svc.clock.advance(seconds=1)
    assert _due(svc)
    svc.tick()
    assert lease_row(svc, lease["id"]).state == LeaseState.EXPIRED
    svc.agents_report_ready()
    assert not _due(svc)  # expired, the lease has no deadline left


def test_a_pending_lease_and_a_silent_agent_are_due_at_their_deadlines(svc: Service) -> None:
    svc.tick()  # the pool's first worker is created; its agent never calls back
    silent = [w.id for w in svc.workers("provisioning")]
    assert silent
    lease = request_lease(svc.client, svc.tenant()["token"]).get_json()
    assert lease["state"] == "pending"
    assert not _due(svc)
    svc.clock.advance(minutes=3)  # the worker's provision_timeout
    assert _due(svc)
    svc.tick()
    assert not set(silent) & {w.id for w in svc.workers("provisioning")}  # timed out
    assert not _due(svc)  # its replacement is not due for another 3 minutes
    svc.clock.advance(minutes=2)  # the lease's pending_timeout, before that
    assert _due(svc)
    svc.tick()
    assert lease_row(svc, lease["id"]).state == LeaseState.FAILED
