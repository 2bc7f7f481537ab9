"""Refill keeps the warm pool at min_ready, within max_workers; PATCH and disabling take effect."""

from __future__ import annotations

from typing import Any

import pytest

from provisioners import TransientProvisionerError
from service.models import EndReason, LeaseState, WorkerState
from tests.api.helpers import (
    POOL,
    admin_pool,
    events_of,
    lease_row,
    patch_pool,
    pool_row,
    request_lease,
)
from tests.conftest import Service, bearer, pool_config


@pytest.fixture
def pools() -> list[dict[str, Any]]:
    return [pool_config(min_ready=2, max_workers=4)]


def _not_destroyed(svc: Service) -> list[str]:
    return [w.id for w in svc.workers() if w.state != WorkerState.DESTROYED]


def test_refill_brings_the_pool_back_to_min_ready_after_leases(svc: Service) -> None:
    svc.warm()
    assert len(svc.workers("ready")) == 2
    tokens = [svc.tenant(f"t{i}")["token"] for i in range(2)]
    for token in tokens:
        assert request_lease(svc.client, token).status_code == 201
    assert svc.workers("ready") == []

    svc.warm()
    assert len(svc.workers("ready")) == 2
    assert len(svc.workers("leased")) == 2
    assert svc.cloud.live_ids() == set(_not_destroyed(svc))
    svc.warm()  # a further round changes nothing: the pool is full
    assert len(_not_destroyed(svc)) == 4


def test_refill_never_exceeds_max_workers_counting_every_unfinished_worker(svc: Service) -> None:
    svc.warm()
    tokens = [svc.tenant(f"t{i}")["token"] for i in range(6)]
    answers = [request_lease(svc.client, token) for token in tokens]
    assert [a.status_code for a in answers] == [201, 201, 202, 202, 202, 202]
    for _ in range(3):
        svc.warm()
        assert len(_not_destroyed(svc)) <= 4
        assert len(svc.cloud.live_ids()) <= 4
    assert len(svc.workers("leased")) == 4
    assert admin_pool(svc)["counts"]["pending_leases"] == 2

    # Workers of ended leases count until destroyed: with one destroy failing, one
    # stays `destroying` and only three new workers may start.
    svc.cloud.inject("destroy", TransientProvisionerError("api down"))
    for answer, token in list(zip(answers, tokens, strict=True))[:2]:
        lease_id = answer.get_json()["id"]
        assert svc.client.delete(f"/v1/leases/{lease_id}", headers=bearer(token)).status_code == 200
    svc.tick()  # refill runs before the destroy pass: both still count, nothing starts
    assert admin_pool(svc)["counts"]["destroying"] == 1
    assert len(_not_destroyed(svc)) == 3
    svc.tick()  # the retry waits for its backoff; one free slot, one new worker
    assert admin_pool(svc)["counts"]["destroying"] == 1
    assert admin_pool(svc)["counts"]["provisioning"] == 1
    assert len(_not_destroyed(svc)) == 4
    assert len(svc.cloud.live_ids()) <= 4


def test_lowering_min_ready_destroys_surplus_ready_workers_at_the_next_tick(svc: Service) -> None:
    svc.warm()
    assert len(svc.workers("ready")) == 2
    response = patch_pool(svc, min_ready=0)
    assert response.status_code == 200
    assert response.get_json()["min_ready"] == 0
    assert pool_row(svc).min_ready == 0
    assert len(svc.workers("ready")) == 2  # nothing happens before the scheduler runs

    svc.tick()
    assert svc.workers("ready") == []
    assert len(svc.workers("destroyed")) == 2
    assert svc.cloud.live_ids() == set()


def test_patch_refuses_min_ready_above_max_workers(svc: Service) -> None:
    changes: dict[str, int]
    for changes in ({"min_ready": 5}, {"max_workers": 1}, {"min_ready": 3, "max_workers": 2}):
        response = patch_pool(svc, POOL, **changes)
        assert response.status_code == 422, changes
        assert response.content_type == "application/problem+json"
    assert (pool_row(svc).min_ready, pool_row(svc).max_workers) == (2, 4)
    assert patch_pool(svc, min_ready=-1).status_code == 422
    assert patch_pool(svc, name="no-such-pool", min_ready=1).status_code == 404


def test_disabling_a_pool_fails_its_pending_leases_and_hides_it(svc: Service) -> None:
    token = svc.tenant()["token"]
    pending = request_lease(svc.client, token).get_json()
    assert pending["state"] == "pending"

    assert patch_pool(svc, enabled=False).status_code == 200
    assert pool_row(svc).enabled is False
    svc.tick()

    row = lease_row(svc, pending["id"])
    assert (row.state, row.end_reason) == (LeaseState.FAILED, EndReason.FAILED)
    other = svc.tenant("other")["token"]
    refused = request_lease(svc.client, other)
    assert refused.status_code == 404
    assert refused.content_type == "application/problem+json"
    listed = svc.client.get("/v1/pools", headers=bearer(other)).get_json()["pools"]
    assert POOL not in [p["name"] for p in listed]
    assert svc.cloud.live_ids() == set()  # no new workers for a disabled pool


@pytest.mark.parametrize(
    "pools", [[pool_config(options={"warning": "workers are not isolated"})]], indirect=False
)
def test_a_provisioner_warning_is_shown_on_the_pool_and_audited(
    svc: Service, pools: list[dict[str, Any]]
) -> None:
    assert admin_pool(svc)["warning"] is None  # the scheduler has not looked yet
    svc.tick()
    assert admin_pool(svc)["warning"] == "workers are not isolated"
    assert any("warning: workers are not isolated" in e.reason for e in events_of(svc, POOL))
