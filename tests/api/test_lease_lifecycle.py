"""Leases over time: idempotent requests, the pending queue, waiting, renew and expiry."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from service.models import EndReason, LeaseState, WorkerState
from tests.api.helpers import events_of, lease_row, request_lease, worker_state
from tests.conftest import Service, bearer, pool_config


@pytest.fixture
def pools() -> list[dict[str, Any]]:
    return [
        pool_config(
            min_ready=1,
            max_workers=4,
            lease_idle_timeout="10m",
            lease_max_lifetime="1h",
            pending_timeout="5m",
        )
    ]


def test_second_request_of_a_tenant_returns_its_live_lease_with_200(svc: Service) -> None:
    svc.warm()
    token = svc.tenant()["token"]
    first = request_lease(svc.client, token)
    again = request_lease(svc.client, token)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.get_json()["worker"]["id"] == first.get_json()["worker"]["id"]
    assert len(svc.workers("leased")) == 1


def test_pending_lease_is_answered_202_then_activated_when_a_worker_is_ready(svc: Service) -> None:
    token = svc.tenant()["token"]
    response = request_lease(svc.client, token)
    assert response.status_code == 202
    lease = response.get_json()
    assert (lease["state"], lease["worker"]) == ("pending", None)
    assert response.headers["Location"] == f"/v1/leases/{lease['id']}"
    assert int(response.headers["Retry-After"]) > 0
    assert lease_row(svc, lease["id"]).state == LeaseState.PENDING
    assert request_lease(svc.client, token).status_code == 200  # still the same pending lease

    svc.tick()  # refill starts min_ready + 1 pending worker
    assert len(svc.workers("provisioning")) == 2
    svc.agents_report_ready()

    got = svc.client.get(response.headers["Location"], headers=bearer(token)).get_json()
    assert got["state"] == "active"
    assert got["worker"]["access_token"].startswith("wla_")
    row = lease_row(svc, lease["id"])
    assert (row.state, row.worker_id) == (LeaseState.ACTIVE, got["worker"]["id"])
    assert worker_state(svc, got["worker"]["id"]) == WorkerState.LEASED
    assert [(e.from_state, e.to_state) for e in events_of(svc, lease["id"])] == [
        (None, "pending"),
        ("pending", "active"),
    ]


def test_pending_leases_are_served_first_come_first_served(svc: Service) -> None:
    svc.warm()
    holder = request_lease(svc.client, svc.tenant("holder")["token"])
    assert holder.status_code == 201
    first = request_lease(svc.client, svc.tenant("first")["token"]).get_json()
    svc.clock.advance(seconds=1)
    second = request_lease(svc.client, svc.tenant("second")["token"]).get_json()
    assert first["state"] == second["state"] == "pending"

    svc.tick()
    [_, two, *_] = sorted(svc.workers("provisioning"), key=lambda w: w.id)
    resource = svc.cloud.resources[two.id]
    ready = svc.client.post(
        f"/v1/workers/{two.id}/ready",
        headers=bearer(resource.spec.bootstrap_token),
        json={"agent_url": "http://127.0.0.1:1/"},
    )
    assert ready.status_code == 200

    assert lease_row(svc, first["id"]).worker_id == two.id
    assert lease_row(svc, second["id"]).state == LeaseState.PENDING
    svc.agents_report_ready()
    assert lease_row(svc, second["id"]).state == LeaseState.ACTIVE


def test_wait_seconds_returns_201_once_a_worker_reports_ready_during_the_wait(svc: Service) -> None:
    token = svc.tenant()["token"]
    svc.tick()  # workers are created, their agents have not called back yet
    assert len(svc.workers("provisioning")) == 1
    waiters = svc.client.application.extensions["workerlease"].flow.waiters

    def agent_calls_back_once_the_request_waits() -> None:
        wait_for(lambda: waiters.waiting() == 1, "the lease request never started waiting")
        svc.agents_report_ready()

    agent = threading.Thread(target=agent_calls_back_once_the_request_waits)
    agent.start()
    response = request_lease(svc.client, token, wait_seconds=60)
    agent.join()

    # 201 after a wait: the activation woke it (a wait that ran out answers 202).
    assert response.status_code == 201
    assert response.get_json()["state"] == "active"
    assert "Retry-After" not in response.headers
    assert lease_row(svc, response.get_json()["id"]).state == LeaseState.ACTIVE


def test_wait_seconds_without_a_worker_answers_202_after_the_wait(svc: Service) -> None:
    token = svc.tenant()["token"]
    started = time.monotonic()
    response = request_lease(svc.client, token, wait_seconds=1)
    assert time.monotonic() - started >= 0.9  # it did wait
    assert response.status_code == 202
    assert response.get_json()["state"] == "pending"
    assert response.headers["Retry-After"] == "2"


def test_a_lease_already_held_is_answered_at_once_even_with_wait_seconds(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = svc.tenant()["token"]
    first = request_lease(svc.client, token)
    assert first.status_code == 202
    waiters = svc.client.application.extensions["workerlease"].flow.waiters

    def must_not_wait(*_args: Any) -> bool:
        raise AssertionError("a request for a lease already held waited")

    monkeypatch.setattr(waiters, "wait", must_not_wait)
    again = request_lease(svc.client, token, wait_seconds=60)
    assert again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"]


def wait_for(condition: Callable[[], bool], message: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.01)


def test_idle_lease_expires_and_its_worker_is_destroyed(svc: Service) -> None:
    svc.warm()
    lease = request_lease(svc.client, svc.tenant()["token"]).get_json()
    worker_id = lease["worker"]["id"]
    svc.clock.advance(minutes=9)
    svc.tick()
    assert lease_row(svc, lease["id"]).state == LeaseState.ACTIVE

    svc.clock.advance(minutes=1, seconds=1)
    svc.tick()
    row = lease_row(svc, lease["id"])
    assert (row.state, row.end_reason) == (LeaseState.EXPIRED, EndReason.IDLE_TIMEOUT)
    assert row.ended_at == svc.clock.now()
    assert worker_state(svc, worker_id) == WorkerState.DESTROYED
    assert worker_id not in svc.cloud.live_ids()
    assert ("destroy", worker_id) in svc.cloud.calls


def test_renew_pushes_the_idle_deadline_but_not_the_maximum_lifetime(svc: Service) -> None:
    svc.warm()
    token = svc.tenant()["token"]
    lease = request_lease(svc.client, token).get_json()
    expires_at = lease["expires_at"]
    for _ in range(7):  # 7 x 9 minutes: past the 1 h lifetime, never idle for 10 minutes
        svc.clock.advance(minutes=9)
        svc.tick()
        renewed = svc.client.post(f"/v1/leases/{lease['id']}/renew", headers=bearer(token))
        if renewed.status_code == 409:
            break
        assert renewed.status_code == 200
        body = renewed.get_json()
        assert body["expires_at"] == expires_at
        row = lease_row(svc, lease["id"])
        assert row.idle_expires_at == svc.clock.now() + timedelta(minutes=10)

    row = lease_row(svc, lease["id"])
    assert (row.state, row.end_reason) == (LeaseState.EXPIRED, EndReason.MAX_LIFETIME)
    assert row.activated_at is not None and row.ended_at is not None
    assert row.ended_at - row.activated_at <= timedelta(hours=1, minutes=9)
    assert worker_state(svc, lease["worker"]["id"]) == WorkerState.DESTROYED
    assert renewed.status_code == 409
    assert renewed.content_type == "application/problem+json"


def test_renew_after_release_is_a_409_conflict(svc: Service) -> None:
    svc.warm()
    token = svc.tenant()["token"]
    lease = request_lease(svc.client, token).get_json()
    assert svc.client.delete(f"/v1/leases/{lease['id']}", headers=bearer(token)).status_code == 200
    response = svc.client.post(f"/v1/leases/{lease['id']}/renew", headers=bearer(token))
    assert response.status_code == 409
    assert response.get_json()["status"] == 409
    assert lease_row(svc, lease["id"]).state == LeaseState.RELEASED


def test_pending_lease_fails_after_pending_timeout(svc: Service) -> None:
    svc.cloud.inject("create", *[RuntimeError("no capacity")] * 20)
    token = svc.tenant()["token"]
    lease = request_lease(svc.client, token).get_json()
    svc.clock.advance(minutes=4)
    svc.tick()
    assert lease_row(svc, lease["id"]).state == LeaseState.PENDING
    svc.clock.advance(minutes=1, seconds=1)
    svc.tick()
    row = lease_row(svc, lease["id"])
    assert (row.state, row.end_reason) == (LeaseState.FAILED, EndReason.FAILED)
    assert row.worker_id is None
    got = svc.client.get(f"/v1/leases/{lease['id']}", headers=bearer(token)).get_json()
    assert (got["state"], got["end_reason"]) == ("failed", "failed")
    # The tenant may ask again: the failed lease no longer counts as live.
    assert request_lease(svc.client, token).status_code == 202
