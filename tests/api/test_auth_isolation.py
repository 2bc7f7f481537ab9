"""Authentication, tenant isolation, disabling a tenant, and the agent's one-time ready callback."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from werkzeug.test import TestResponse

from service.models import EndReason, LeaseState, WorkerState
from tests.api.helpers import POOL, lease_row, request_lease, worker_state
from tests.conftest import Service, admin, bearer, pool_config

COLD = "cold-pool"


@pytest.fixture
def pools() -> list[dict[str, Any]]:
    return [
        pool_config(min_ready=2, max_workers=4),
        pool_config(name=COLD, min_ready=0, max_workers=2),
    ]


def _problem(response: TestResponse, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = response.get_json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def test_another_tenant_gets_404_for_a_lease_it_does_not_hold(svc: Service) -> None:
    svc.warm()
    alice, bob = svc.tenant("alice"), svc.tenant("bob")
    lease = request_lease(svc.client, alice["token"]).get_json()
    path = f"/v1/leases/{lease['id']}"

    _problem(svc.client.get(path, headers=bearer(bob["token"])), 404)
    _problem(svc.client.post(f"{path}/renew", headers=bearer(bob["token"])), 404)
    _problem(svc.client.delete(path, headers=bearer(bob["token"])), 404)

    row = lease_row(svc, lease["id"])
    assert (row.state, row.tenant_id) == (LeaseState.ACTIVE, alice["id"])
    assert row.idle_expires_at is not None
    assert row.idle_expires_at.isoformat().startswith(lease["idle_expires_at"][:19])
    assert worker_state(svc, lease["worker"]["id"]) == WorkerState.LEASED
    listed = svc.client.get("/v1/leases?state=all", headers=bearer(bob["token"])).get_json()
    assert listed["leases"] == []


def test_access_token_is_shown_only_to_the_lease_tenant(svc: Service) -> None:
    svc.warm()
    alice, bob = svc.tenant("alice"), svc.tenant("bob")
    lease = request_lease(svc.client, alice["token"]).get_json()
    secret = lease["worker"]["access_token"]
    assert secret.startswith("wla_")
    own = svc.client.get(f"/v1/leases/{lease['id']}", headers=bearer(alice["token"]))
    assert own.get_json()["worker"]["access_token"] == secret

    seen = [
        svc.client.get("/v1/leases?state=all", headers=bearer(bob["token"])),
        request_lease(svc.client, bob["token"]),
        svc.client.get("/v1/admin/leases", headers=admin()),
        svc.client.get("/v1/admin/workers", headers=admin()),
        svc.client.get("/v1/admin/tenants", headers=admin()),
        svc.client.get("/v1/admin/events", headers=admin()),
        svc.client.delete(f"/v1/admin/workers/{lease['worker']['id']}", headers=admin()),
    ]
    for response in seen:
        assert response.status_code in (200, 201, 202)
        text = response.get_data(as_text=True)
        assert secret not in text
        assert alice["token"] not in text
    admin_leases = seen[2].get_json()["leases"]
    assert all(
        item["worker"] is None or item["worker"]["access_token"] is None for item in admin_leases
    )
    # The worker's access token is no tenant token either.
    _problem(svc.client.get("/v1/leases", headers=bearer(secret)), 401)


def test_missing_or_unknown_token_is_401_with_www_authenticate(svc: Service) -> None:
    for headers in [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wlt_not-a-real-token"},
        {"Authorization": "Bearer garbage"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "wlt_token-without-scheme"},
    ]:
        for path in ("/v1/leases", "/v1/pools", "/v1/admin/pools", "/v1/admin/tenants"):
            response = svc.client.get(path, headers=headers)
            _problem(response, 401)
            assert response.headers["WWW-Authenticate"].startswith("Bearer"), (path, headers)


def test_unauthenticated_lease_request_creates_nothing(svc: Service) -> None:
    _problem(svc.client.post("/v1/leases", json={"pool": POOL}), 401)
    _problem(svc.client.post("/v1/leases", json={"pool": POOL}, headers=bearer("wlt_forged")), 401)
    assert svc.client.get("/v1/admin/leases", headers=admin()).get_json()["leases"] == []


def test_tenant_token_on_admin_endpoints_is_403(svc: Service) -> None:
    token = svc.tenant()["token"]
    for method, path in [
        ("GET", "/v1/admin/pools"),
        ("GET", "/v1/admin/tenants"),
        ("POST", "/v1/admin/tenants"),
        ("GET", "/v1/admin/leases"),
        ("GET", "/v1/admin/workers"),
        ("GET", "/v1/admin/events"),
        ("PATCH", f"/v1/admin/pools/{POOL}"),
    ]:
        response = svc.client.open(path, method=method, json={"name": "x"}, headers=bearer(token))
        _problem(response, 403)
    assert len(svc.client.get("/v1/admin/tenants", headers=admin()).get_json()["tenants"]) == 1


def test_admin_token_on_tenant_endpoints_is_403(svc: Service) -> None:
    for method, path in [("GET", "/v1/leases"), ("POST", "/v1/leases"), ("GET", "/v1/pools")]:
        response = svc.client.open(path, method=method, json={"pool": POOL}, headers=admin())
        _problem(response, 403)


def test_disabled_tenant_loses_its_token_and_its_leases(svc: Service) -> None:
    svc.warm()
    tenant = svc.tenant("leaving")
    active = request_lease(svc.client, tenant["token"]).get_json()
    pending = request_lease(svc.client, tenant["token"], pool=COLD).get_json()
    assert (active["state"], pending["state"]) == ("active", "pending")

    response = svc.client.delete(f"/v1/admin/tenants/{tenant['id']}", headers=admin())
    assert response.status_code == 200
    assert response.get_json()["enabled"] is False

    _problem(svc.client.get("/v1/leases", headers=bearer(tenant["token"])), 401)
    _problem(request_lease(svc.client, tenant["token"]), 401)
    ended = lease_row(svc, active["id"])
    assert (ended.state, ended.end_reason) == (LeaseState.REVOKED, EndReason.REVOKED)
    failed = lease_row(svc, pending["id"])
    assert (failed.state, failed.end_reason) == (LeaseState.FAILED, EndReason.FAILED)
    svc.tick()
    worker_id = active["worker"]["id"]
    assert worker_state(svc, worker_id) == WorkerState.DESTROYED
    assert worker_id not in svc.cloud.live_ids()
    again = svc.client.delete(f"/v1/admin/tenants/{tenant['id']}", headers=admin())
    assert again.status_code == 200


def test_ready_callback_needs_the_workers_own_one_time_bootstrap_token(
    svc: Service, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="workerlease.workers")
    svc.tick()
    first, second = svc.workers("provisioning")
    token = svc.cloud.resources[first.id].spec.bootstrap_token
    other = svc.cloud.resources[second.id].spec.bootstrap_token
    body = {"agent_url": "http://127.0.0.1:1/"}

    def ready(worker_id: str, bootstrap: str) -> TestResponse:
        return svc.client.post(
            f"/v1/workers/{worker_id}/ready", json=body, headers=bearer(bootstrap)
        )

    _problem(ready(first.id, "wlb_wrong"), 401)
    _problem(ready(first.id, other), 401)  # another worker's token
    _problem(svc.client.post(f"/v1/workers/{first.id}/ready", json=body), 401)
    assert worker_state(svc, first.id) == WorkerState.PROVISIONING
    assert "ready_callback_repeated" not in caplog.text  # wrong tokens are not repeats

    accepted = ready(first.id, token)
    assert accepted.status_code == 200
    assert accepted.get_json()["access_token"].startswith("wla_")
    assert worker_state(svc, first.id) == WorkerState.READY
    used = _problem(ready(first.id, token), 401)  # used once, never again
    # Said to the operator, not to the caller: the agent missed its first answer.
    assert f"ready_callback_repeated worker={first.id} state=ready" in caplog.text
    unknown = _problem(ready("w-0123456789abcdef0123", token), 401)
    assert unknown == used  # an unknown worker looks like a wrong token: no oracle of ids
    assert json.dumps(accepted.get_json()).count("wlb_") == 0


def test_ready_callback_checks_the_token_before_reading_the_body(svc: Service) -> None:
    svc.tick()
    worker = svc.workers("provisioning")[0]
    for body in ['{"a":' * 1000, "[" * 5000, '{"agent_url": 5}']:
        response = svc.client.post(
            f"/v1/workers/{worker.id}/ready",
            data=body,
            headers={**bearer("wlb_wrong"), "Content-Type": "application/json"},
        )
        _problem(response, 401)


@pytest.mark.parametrize("settings", [{"metrics_token": "scrape-token-0123456789"}])
def test_metrics_need_the_metrics_token_when_one_is_set(svc: Service) -> None:
    assert svc.client.get("/metrics").status_code == 401
    assert svc.client.get("/metrics", headers=bearer("wrong-token-0123456789")).status_code == 401
    answer = svc.client.get("/metrics", headers=bearer("scrape-token-0123456789"))
    assert answer.status_code == 200
    assert "workerlease_workers" in answer.get_data(as_text=True)


def test_metrics_are_open_when_no_metrics_token_is_set(svc: Service) -> None:
    assert svc.client.get("/metrics").status_code == 200
