"""A warm take rings the demand doorbell, and the rung demand pass refills the ready deficit."""

from __future__ import annotations

from flask import Flask

from service.doorbell import Bell, Listener, NoBell
from service.passes.maintain import answer_demand
from tests.conftest import Service, bearer


class RecordingBell(Bell):
    def __init__(self) -> None:
        self.rings = 0

    def ring(self) -> None:
        self.rings += 1

    def listener(self) -> Listener:
        return NoBell().listener()


def _lease(svc: Service, token: str) -> dict[str, object]:
    response = svc.client.post("/v1/leases", json={"pool": "hosted-ubuntu"}, headers=bearer(token))
    assert response.status_code == 201, response.get_json()
    body: dict[str, object] = response.get_json()
    return body


def test_a_warm_take_rings_and_the_rung_pass_starts_its_replacement(
    svc: Service, app: Flask
) -> None:
    bell = RecordingBell()
    app.extensions["workerlease"].flow.bell = bell
    svc.warm()
    assert len(svc.workers("ready")) == 2

    _lease(svc, svc.tenant()["token"])

    assert bell.rings == 1
    created_before = [c for c in svc.cloud.calls if c[0] == "create"]
    answer_demand(svc.rt, rung=False)  # the poll: no pending lease, nothing to do
    assert [c for c in svc.cloud.calls if c[0] == "create"] == created_before
    answer_demand(svc.rt, rung=True)  # the ring: the pool is one ready worker short
    provisioning = svc.workers("provisioning")
    assert len(provisioning) == 1
    assert ("create", provisioning[0].id) in svc.cloud.calls


def test_a_lease_already_held_does_not_ring(svc: Service, app: Flask) -> None:
    bell = RecordingBell()
    app.extensions["workerlease"].flow.bell = bell
    svc.warm()
    token = svc.tenant()["token"]
    _lease(svc, token)
    again = svc.client.post("/v1/leases", json={"pool": "hosted-ubuntu"}, headers=bearer(token))
    assert again.status_code == 200
    assert bell.rings == 1


def test_a_rung_pass_leaves_a_pool_in_create_backoff_alone(svc: Service) -> None:
    svc.cloud.inject("create", RuntimeError("quota"), RuntimeError("quota"))
    svc.tick()  # both creates fail: the pool backs off, two ready workers short
    calls = len(svc.cloud.calls)
    answer_demand(svc.rt, rung=True)
    assert len(svc.cloud.calls) == calls
