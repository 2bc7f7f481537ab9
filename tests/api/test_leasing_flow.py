"""The lease lifecycle through the HTTP API, with the scheduler's passes run by hand."""

from __future__ import annotations

from tests.conftest import Service, bearer


def test_warm_lease_is_active_with_worker_and_token(svc: Service) -> None:
    svc.warm()
    tenant = svc.tenant()
    response = svc.client.post(
        "/v1/leases", json={"pool": "hosted-ubuntu"}, headers=bearer(tenant["token"])
    )
    assert response.status_code == 201
    lease = response.get_json()
    assert lease["state"] == "active"
    assert lease["worker"]["access_token"].startswith("wla_")
    assert response.headers["Location"] == f"/v1/leases/{lease['id']}"
    leased = svc.workers("leased")
    assert [w.id for w in leased] == [lease["worker"]["id"]]


def test_released_worker_is_destroyed_and_never_reused(svc: Service) -> None:
    svc.warm()
    token = svc.tenant()["token"]
    first = svc.client.post(
        "/v1/leases", json={"pool": "hosted-ubuntu"}, headers=bearer(token)
    ).get_json()
    released = svc.client.delete(f"/v1/leases/{first['id']}", headers=bearer(token))
    assert released.status_code == 200
    assert released.get_json()["state"] == "released"
    assert released.get_json()["end_reason"] == "released"
    again = svc.client.delete(f"/v1/leases/{first['id']}", headers=bearer(token))
    assert again.get_json() == released.get_json()

    svc.tick()
    worker_id = first["worker"]["id"]
    assert worker_id not in svc.cloud.live_ids()
    assert ("destroy", worker_id) in svc.cloud.calls
    assert {w.id for w in svc.workers("destroyed")} == {worker_id}

    svc.agents_report_ready()
    second = svc.client.post(
        "/v1/leases", json={"pool": "hosted-ubuntu"}, headers=bearer(token)
    ).get_json()
    assert second["worker"]["id"] != worker_id
