"""A pending lease says why it waits, to its tenant and to the admin; others say nothing."""

from __future__ import annotations

from typing import Any

import pytest

from provisioners import TransientProvisionerError
from tests.api.helpers import request_lease
from tests.conftest import Service, admin, bearer, pool_config


@pytest.fixture
def pools() -> list[dict[str, Any]]:
    return [pool_config(min_ready=0, max_workers=2)]


def _reasons(svc: Service, leases: list[tuple[str, str]]) -> list[dict[str, Any] | None]:
    """Each lease's waiting_reason as its tenant sees it, checked against the admin list."""
    mine = [
        svc.client.get(f"/v1/leases/{lease_id}", headers=bearer(token)).get_json()
        for token, lease_id in leases
    ]
    listed = svc.client.get("/v1/admin/leases?state=all&limit=100", headers=admin()).get_json()
    by_id = {lease["id"]: lease["waiting_reason"] for lease in listed["leases"]}
    assert [by_id[lease["id"]] for lease in mine] == [lease["waiting_reason"] for lease in mine]
    return [lease["waiting_reason"] for lease in mine]


def _kinds(reasons: list[dict[str, Any] | None]) -> list[tuple[str, int] | None]:
    return [(r["kind"], r["leases_ahead"]) if r else None for r in reasons]


def test_pending_leases_say_whether_a_worker_comes_or_how_many_are_ahead(svc: Service) -> None:
    leases = []
    for i in range(4):
        token = svc.tenant(f"t{i}")["token"]
        response = request_lease(svc.client, token)
        assert response.status_code == 202
        assert response.get_json()["waiting_reason"]["kind"]  # the 202 says why, too
        leases.append((token, response.get_json()["id"]))
        svc.clock.advance(seconds=1)  # the queue's order is the request time

    # max_workers 2: the first two get a worker each, the others queue behind them.
    expected = [
        ("worker_on_its_way", 0),
        ("worker_on_its_way", 1),
        ("queued_behind", 2),
        ("queued_behind", 3),
    ]
    assert _kinds(_reasons(svc, leases)) == expected
    svc.tick()
    reasons = _reasons(svc, leases)
    assert _kinds(reasons) == expected
    assert reasons[0] is not None and reasons[0]["workers_on_the_way"] == 2
    assert reasons[0]["time_to_worker_s"] is None  # no worker of this pool was ready yet
    assert reasons[3] is not None and "max_workers (2)" in reasons[3]["detail"]

    svc.clock.advance(seconds=30)
    svc.agents_report_ready()  # the two workers go to the two oldest leases
    reasons = _reasons(svc, leases)
    assert _kinds(reasons) == [None, None, ("pool_at_max_workers", 0), ("queued_behind", 1)]
    assert reasons[2] is not None and reasons[2]["time_to_worker_s"] == pytest.approx(30)
    assert "max_workers" in reasons[2]["detail"]


def test_a_pending_lease_names_the_failing_provisioner(svc: Service) -> None:
    svc.cloud.inject("create", TransientProvisionerError("quota exceeded"))
    token = svc.tenant()["token"]
    lease_id = request_lease(svc.client, token).get_json()["id"]
    svc.tick()  # the create fails: the pool is degraded and backs off
    (reason,) = _reasons(svc, [(token, lease_id)])
    assert reason is not None and reason["kind"] == "provisioner_degraded"
    assert "quota exceeded" in reason["degraded_reason"]
    assert "quota exceeded" in reason["detail"]


def test_a_warm_lease_has_no_waiting_reason(svc: Service) -> None:
    pool_warm = svc.client.patch(
        "/v1/admin/pools/hosted-ubuntu", json={"min_ready": 1}, headers=admin()
    )
    assert pool_warm.status_code == 200
    svc.warm()
    token = svc.tenant()["token"]
    response = request_lease(svc.client, token)
    assert response.status_code == 201
    assert response.get_json()["waiting_reason"] is None
