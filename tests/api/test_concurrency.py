"""Both leasing invariants hold under concurrent requests, and the database enforces them."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Flask
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from service.db import session_factory, session_scope
from service.models import LIVE_LEASE_STATES, Lease, LeaseState
from tests.api.helpers import POOL, lease_rows, request_lease
from tests.conftest import Service, pool_config

TENANTS = 36
SAME_TENANT_THREADS = 8
READY = 10


@pytest.fixture
def pools() -> list[dict[str, Any]]:
    return [pool_config(min_ready=READY, max_workers=60)]


def _concurrently(app: Flask, tokens: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """POST /v1/leases from one thread per token, all released at once; each its own client."""
    barrier = threading.Barrier(len(tokens))
    results: list[tuple[int, dict[str, Any]] | None] = [None] * len(tokens)

    def run(index: int, token: str) -> None:
        client = app.test_client()
        barrier.wait()
        response = request_lease(client, token)
        results[index] = (response.status_code, response.get_json())

    threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate(tokens)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(r is not None for r in results), "a request thread did not finish"
    return [r for r in results if r is not None]


def _assert_invariants(svc: Service) -> list[Lease]:
    leases = lease_rows(svc)
    workers = Counter(lease.worker_id for lease in leases if lease.worker_id)
    assert [w for w, n in workers.items() if n > 1] == [], "a worker is in two leases"
    live = Counter(
        (lease.tenant_id, lease.pool) for lease in leases if lease.state in LIVE_LEASE_STATES
    )
    assert [k for k, n in live.items() if n > 1] == [], "a tenant holds two live leases"
    leased = {w.id for w in svc.workers("leased")}
    assert leased == {lease.worker_id for lease in leases if lease.state == LeaseState.ACTIVE}
    return leases


def _warm_fully(svc: Service) -> None:
    """A tick starts at most max_concurrent_creates workers per pool: tick until all are up."""
    for _ in range(READY):
        svc.warm()
        if len(svc.workers("ready")) == READY:
            return
    raise AssertionError("the pool never reached min_ready")


def test_concurrent_requests_from_many_tenants_never_share_a_worker(
    app: Flask, svc: Service
) -> None:
    _warm_fully(svc)
    tokens = [svc.tenant(f"tenant-{i}")["token"] for i in range(TENANTS)]

    results = _concurrently(app, tokens)

    statuses = Counter(status for status, _ in results)
    assert set(statuses) <= {201, 202}, statuses
    leases = _assert_invariants(svc)
    assert len(leases) == TENANTS
    active = [body for status, body in results if status == 201]
    assert len({body["worker"]["id"] for body in active}) == len(active)
    assert all(body["worker"] is None for status, body in results if status == 202)
    # Every warm worker went to exactly one request. (On PostgreSQL a request that finds
    # another's pending lease queues behind it, leaving its worker to the next pass.)
    assert len(active) + len(svc.workers("ready")) == READY
    assert len(active) >= 1

    # The queue is served afterwards, still one worker per lease.
    svc.tick()
    svc.agents_report_ready()
    _assert_invariants(svc)


def test_concurrent_requests_of_one_tenant_all_get_the_same_lease(app: Flask, svc: Service) -> None:
    _warm_fully(svc)
    token = svc.tenant("busy")["token"]
    others = [svc.tenant(f"other-{i}")["token"] for i in range(TENANTS - SAME_TENANT_THREADS)]

    results = _concurrently(app, [token] * SAME_TENANT_THREADS + others)

    mine = results[:SAME_TENANT_THREADS]
    assert all(status in (200, 201, 202) for status, _ in results)
    assert len({body["id"] for _, body in mine}) == 1
    # One request created the lease; every other one got it back as the existing lease.
    statuses = Counter(status for status, _ in mine)
    assert statuses[200] == SAME_TENANT_THREADS - 1
    assert statuses[201] + statuses[202] == 1
    leases = _assert_invariants(svc)
    assert len(leases) == 1 + len(others)


def test_database_refuses_a_second_live_lease_for_a_tenant_and_pool(svc: Service) -> None:
    tenant = svc.tenant()
    assert request_lease(svc.client, tenant["token"]).status_code == 202
    now = datetime.now(UTC)
    with pytest.raises(IntegrityError), session_scope(session_factory(svc.engine)) as session:
        session.add(
            Lease(
                id="l-00000000000000000001",
                tenant_id=tenant["id"],
                pool=POOL,
                state=LeaseState.ACTIVE,
                created_at=now,
            )
        )
    # An ended lease next to the live one is fine: the index covers live states only.
    with session_scope(session_factory(svc.engine)) as session:
        session.add(
            Lease(
                id="l-00000000000000000002",
                tenant_id=tenant["id"],
                pool=POOL,
                state=LeaseState.RELEASED,
                created_at=now,
            )
        )


def test_database_refuses_a_second_lease_on_the_same_worker(svc: Service) -> None:
    svc.warm()
    first = request_lease(svc.client, svc.tenant("first")["token"]).get_json()
    other = svc.tenant("second")
    now = datetime.now(UTC)
    with pytest.raises(IntegrityError), session_scope(session_factory(svc.engine)) as session:
        # Even an ended lease may not reuse a worker: workers are never handed out twice.
        session.add(
            Lease(
                id="l-00000000000000000003",
                tenant_id=other["id"],
                pool=POOL,
                state=LeaseState.RELEASED,
                worker_id=first["worker"]["id"],
                created_at=now,
            )
        )
    with session_scope(session_factory(svc.engine)) as session:
        holders = session.exec(
            select(Lease.id).where(col(Lease.worker_id) == first["worker"]["id"])
        ).all()
    assert holders == [first["id"]]
