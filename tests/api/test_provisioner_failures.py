"""When the platform misbehaves: slow agents, failing creates and destroys, vanishing machines."""

from __future__ import annotations

from typing import Any

import pytest

from provisioners import PermanentProvisionerError, TransientProvisionerError
from service.models import EndReason, LeaseState, WorkerState
from tests.api.helpers import admin_pool, events_of, lease_row, pool_row, request_lease
from tests.conftest import Service, bearer, pool_config


@pytest.fixture
def pools() -> list[dict[str, Any]]:
    return [pool_config(min_ready=2, max_workers=4, provision_timeout="10m")]


def _creates(svc: Service) -> list[str]:
    return [worker_id for op, worker_id in svc.cloud.calls if op == "create"]


def _destroys(svc: Service, worker_id: str) -> int:
    return svc.cloud.calls.count(("destroy", worker_id))


def _release_while_destroys_fail(svc: Service, *errors: Exception) -> str:
    """Lease a warm worker, make its next destroys fail with ``errors``, release it."""
    svc.warm()
    token = svc.tenant()["token"]
    lease = request_lease(svc.client, token).get_json()
    svc.cloud.inject("destroy", *errors)
    svc.client.delete(f"/v1/leases/{lease['id']}", headers=bearer(token))
    worker_id: str = lease["worker"]["id"]
    return worker_id


def _state(svc: Service, worker_id: str) -> str:
    [worker] = [w for w in svc.workers() if w.id == worker_id]
    return worker.state


def test_worker_not_ready_within_provision_timeout_is_destroyed_and_replaced(svc: Service) -> None:
    svc.tick()
    slow = {w.id for w in svc.workers("provisioning")}
    assert len(slow) == 2 and slow <= svc.cloud.live_ids()

    svc.clock.advance(minutes=9, seconds=59)
    svc.tick()
    assert {w.id for w in svc.workers("provisioning")} == slow

    svc.clock.advance(seconds=2)
    svc.tick()
    assert {w.id for w in svc.workers("destroyed")} == slow
    assert not slow & svc.cloud.live_ids()
    for worker_id in slow:
        moves = [(e.from_state, e.to_state) for e in events_of(svc, worker_id)]
        assert ("provisioning", "failed") in moves and moves[-1] == ("destroying", "destroyed")
    replacements = {w.id for w in svc.workers("provisioning")}
    assert len(replacements) == 2 and replacements <= svc.cloud.live_ids()


def test_failed_create_marks_the_pool_degraded_and_retries_after_backoff(svc: Service) -> None:
    svc.cloud.inject(
        "create",
        TransientProvisionerError("quota exceeded"),
        TransientProvisionerError("quota exceeded"),
    )
    svc.tick()
    failed = _creates(svc)
    assert len(failed) == 2
    for worker_id in failed:
        assert _state(svc, worker_id) == WorkerState.DESTROYED
        assert _destroys(svc, worker_id) == 1  # a half-made resource must not outlive its row
        assert ("provisioning", "failed") in [
            (e.from_state, e.to_state) for e in events_of(svc, worker_id)
        ]
    pool = admin_pool(svc)
    assert "quota exceeded" in pool["degraded_reason"]
    backoff_until = pool_row(svc).create_backoff_until
    assert backoff_until is not None and backoff_until > svc.clock.now()

    svc.tick()  # still backing off: no new create on the very next run
    assert _creates(svc) == failed

    svc.clock.advance(seconds=(backoff_until - svc.clock.now()).total_seconds() + 1)
    svc.tick()
    assert len(_creates(svc)) == 4
    assert admin_pool(svc)["degraded_reason"] is None
    svc.agents_report_ready()
    assert len(svc.workers("ready")) == 2


def test_failed_destroy_is_retried_with_backoff_and_confirmed_before_destroyed(
    svc: Service,
) -> None:
    worker_id = _release_while_destroys_fail(
        svc, TransientProvisionerError("throttled"), TransientProvisionerError("throttled")
    )

    svc.tick()
    assert _state(svc, worker_id) == WorkerState.DESTROYING
    assert worker_id in svc.cloud.live_ids()
    [row] = [w for w in svc.workers() if w.id == worker_id]
    assert row.destroy_attempts == 1 and "throttled" in (row.last_error or "")
    assert row.next_attempt_at is not None and row.next_attempt_at > svc.clock.now()

    svc.tick()  # before the backoff: not tried again
    assert _destroys(svc, worker_id) == 1

    svc.clock.advance(seconds=3)
    svc.tick()  # second failure, a longer backoff
    assert _destroys(svc, worker_id) == 2
    assert _state(svc, worker_id) == WorkerState.DESTROYING

    svc.clock.advance(seconds=5)
    svc.tick()
    assert _destroys(svc, worker_id) == 3
    assert _state(svc, worker_id) == WorkerState.DESTROYED
    assert worker_id not in svc.cloud.live_ids()


def test_a_permanent_destroy_failure_is_surfaced_on_the_pool_and_in_metrics(
    svc: Service,
) -> None:
    worker_id = _release_while_destroys_fail(
        svc, PermanentProvisionerError("AccessDenied: not allowed")
    )

    svc.tick()
    assert _state(svc, worker_id) == WorkerState.DESTROYING  # kept: the machine still exists
    assert "AccessDenied" in (admin_pool(svc)["destroy_error"] or "")
    metrics = svc.client.get("/metrics").get_data(as_text=True)
    assert 'workerlease_pool_degraded{pool="hosted-ubuntu"} 1.0' in metrics
    assert any("destroy failed permanently" in e.reason for e in events_of(svc, worker_id))

    svc.clock.advance(seconds=60)
    svc.tick()  # a permanent error is not hammered: it waits minutes, not seconds
    assert _destroys(svc, worker_id) == 1
    svc.agents_report_ready()  # the replacements are healthy (no callback timeout)

    svc.clock.advance(minutes=10)  # the operator fixed the permissions
    svc.tick()
    assert _state(svc, worker_id) == WorkerState.DESTROYED
    assert admin_pool(svc)["destroy_error"] is None
    metrics = svc.client.get("/metrics").get_data(as_text=True)
    assert 'workerlease_pool_degraded{pool="hosted-ubuntu"} 0.0' in metrics


def test_leased_worker_that_vanishes_fails_its_lease(svc: Service) -> None:
    svc.warm()
    token = svc.tenant()["token"]
    lease = request_lease(svc.client, token).get_json()
    worker_id = lease["worker"]["id"]
    svc.warm()  # the pool is full again before the machine disappears
    creates_before = len(_creates(svc))

    svc.cloud.vanish(worker_id)
    svc.tick()

    row = lease_row(svc, lease["id"])
    assert (row.state, row.end_reason) == (LeaseState.FAILED, EndReason.FAILED)
    moves = [(e.from_state, e.to_state) for e in events_of(svc, worker_id)]
    assert ("leased", "failed") in moves
    assert _state(svc, worker_id) == WorkerState.DESTROYED
    got = svc.client.get(f"/v1/leases/{lease['id']}", headers=bearer(token)).get_json()
    assert (got["state"], got["end_reason"]) == ("failed", "failed")
    assert got["worker"]["access_token"] is None
    # The tenant can lease again at once, from the warm pool.
    assert request_lease(svc.client, token).status_code == 201
    svc.tick()
    assert len(_creates(svc)) == creates_before + 1


def test_ready_worker_that_vanishes_is_failed_and_replaced(svc: Service) -> None:
    svc.warm()
    gone = svc.workers("ready")[0].id
    svc.cloud.vanish(gone)
    svc.tick()
    assert _state(svc, gone) == WorkerState.DESTROYED
    assert ("ready", "failed") in [(e.from_state, e.to_state) for e in events_of(svc, gone)]
    [replacement] = svc.workers("provisioning")
    assert replacement.id in svc.cloud.live_ids()
    svc.agents_report_ready()
    assert len(svc.workers("ready")) == 2


def test_a_worker_that_never_calls_back_marks_the_pool_with_the_reason(
    svc: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that cannot reach the service (wrong public_url or --port) is visible:
    the pool says which worker did not call back, and why that usually is; the log too."""
    svc.tick()
    slow = sorted(w.id for w in svc.workers("provisioning"))
    svc.clock.advance(minutes=10, seconds=1)
    with caplog.at_level("WARNING", logger="workerlease.workers"):
        svc.tick()
    reason = admin_pool(svc)["degraded_reason"]
    assert reason is not None and "did not call back within 10m" in reason
    assert any(worker_id in reason for worker_id in slow)
    assert "public_url" in reason
    logged = [r.getMessage() for r in caplog.records if "provision_timeout" in r.getMessage()]
    assert len(logged) == 2 and all("did not call back within 10m" in m for m in logged)
    assert pool_row(svc).degraded_reason == reason  # workerlease_pool_degraded says 1

    # The replacements' creates succeed, which is no news about callbacks: still marked.
    assert admin_pool(svc)["degraded_reason"] == reason
    # A callback arrives: the service is reachable after all, the mark goes.
    svc.agents_report_ready()
    assert admin_pool(svc)["degraded_reason"] is None
