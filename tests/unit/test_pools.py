"""Pools in the domain: how many workers to start, refill rows, trimming, config and backoff."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import select

from service.config import PoolConfig
from service.models import Lease, LeaseState, Pool, Worker, WorkerState
from service.pools import (
    PROVISION_SAMPLES,
    HistoryMemo,
    PoolCounts,
    _provisioned,
    _requests_since,
    apply_config,
    new_worker,
    note_create_result,
    patch_pool,
    plan_refill,
    pools_by_name,
    trim,
    workers_wanted,
)
from service.schemas import PoolPatch
from service.security import new_id
from tests.conftest import pool_config
from tests.support.fakes import ManualClock
from tests.unit.conftest import Tx, add_ready_worker, add_tenant

POOL = "hosted-ubuntu"


def _pool(min_ready: int, max_workers: int) -> Pool:
    return Pool.model_validate(
        {
            "name": POOL,
            "os": "ubuntu",
            "provisioner": "fake",
            "min_ready": min_ready,
            "max_workers": max_workers,
            "config_min_ready": min_ready,
            "config_max_workers": max_workers,
            "lease_idle_timeout_s": 3600,
            "lease_max_lifetime_s": 3600,
            "provision_timeout_s": 600,
            "pending_timeout_s": 600,
        }
    )


@pytest.mark.parametrize(
    ("ready", "provisioning", "leased", "pending", "wanted"),
    [
        (0, 0, 0, 0, 2),  # an empty pool fills to min_ready
        (1, 1, 0, 0, 0),  # workers on their way count as supply
        (2, 0, 0, 3, 3),  # pending leases add demand
        (0, 0, 4, 9, 1),  # never beyond max_workers (5)
        (5, 0, 0, 0, 0),
    ],
)
def test_workers_wanted_fills_min_ready_plus_pending_within_max_workers(
    ready: int, provisioning: int, leased: int, pending: int, wanted: int
) -> None:
    counts = PoolCounts(
        {
            WorkerState.READY: ready,
            WorkerState.PROVISIONING: provisioning,
            WorkerState.LEASED: leased,
        },
        pending,
    )
    assert workers_wanted(_pool(min_ready=2, max_workers=5), counts) == wanted


def test_plan_refill_commits_provisioning_rows_and_skips_a_pool_in_backoff(
    tx: Tx, clock: ManualClock
) -> None:
    with tx() as session:
        created = plan_refill(session, clock.now())
    assert len(created) == 2
    assert {w.state for w in created} == {WorkerState.PROVISIONING}
    assert all(w.bootstrap_token and w.access_token for w in created)
    with tx() as session:
        pool = session.get(Pool, POOL)
        assert pool is not None
        pool.min_ready = 4
        note_create_result(pool, "CapacityError: none left", clock.now())
    with tx() as session:
        assert plan_refill(session, clock.now()) == []
    clock.advance(seconds=6)  # the first backoff is 5 s
    with tx() as session:
        assert len(plan_refill(session, clock.now())) == 2


def test_backoff_grows_with_each_failure_and_a_success_clears_it(clock: ManualClock) -> None:
    pool = _pool(min_ready=2, max_workers=5)
    delays = []
    for _ in range(4):
        note_create_result(pool, "boom", clock.now())
        assert pool.create_backoff_until is not None
        delays.append((pool.create_backoff_until - clock.now()).total_seconds())
    assert delays == [5, 10, 20, 40]
    assert pool.degraded_reason == "boom"
    note_create_result(pool, None, clock.now())
    assert (pool.create_failures, pool.degraded_reason, pool.create_backoff_until) == (
        0,
        None,
        None,
    )


def test_trim_destroys_the_newest_surplus_ready_workers(tx: Tx, clock: ManualClock) -> None:
    with tx() as session:
        ids = []
        for _ in range(4):
            ids.append(add_ready_worker(session, POOL, clock.now()).id)
            clock.advance(seconds=1)
    with tx() as session:
        assert trim(session, clock.now()) == 2  # min_ready is 2
    with tx() as session:
        states = dict(session.exec(select(Worker.id, Worker.state)).all())
    assert [states[i] for i in ids] == [
        WorkerState.READY,
        WorkerState.READY,
        WorkerState.DESTROYING,
        WorkerState.DESTROYING,
    ]


def test_config_wins_over_a_patch_only_when_the_config_itself_changed(
    tx: Tx, clock: ManualClock
) -> None:
    with tx() as session:
        patch_pool(session, POOL, PoolPatch(min_ready=4), clock.now())
    unchanged = PoolConfig.model_validate(pool_config())
    with tx() as session:
        apply_config(session, [unchanged], clock.now())
    with tx() as session:
        pool = session.get(Pool, POOL)
        assert pool is not None and pool.min_ready == 4
    changed = PoolConfig.model_validate(pool_config(min_ready=1))
    with tx() as session:
        apply_config(session, [changed], clock.now())
    with tx() as session:
        pool = session.get(Pool, POOL)
        assert pool is not None and pool.min_ready == 1


def test_a_pool_removed_from_the_config_is_disabled_not_deleted(tx: Tx, clock: ManualClock) -> None:
    other = PoolConfig.model_validate(pool_config("hosted-windows", os="windows"))
    with tx() as session:
        apply_config(session, [other], clock.now() + timedelta(seconds=1))
    with tx() as session:
        pool = session.get(Pool, POOL)
        assert pool is not None
        assert (pool.enabled, pool.in_config) == (False, False)


def test_the_replays_history_memo_answers_as_the_database_after_rows_are_added(
    tx: Tx, clock: ManualClock
) -> None:
    # The memo reads only the rows at or after the newest it holds; the answers must be
    # what a full read gives, rows at the newest instant and the sample cap included.
    tenant = add_tenant(tx, clock.now())
    memo = HistoryMemo()

    def add(requests: int, ready: int, step_s: float) -> None:
        with tx() as session:
            for _ in range(requests):
                lease = Lease(
                    id=new_id("l"),
                    tenant_id=tenant,
                    pool=POOL,
                    state=LeaseState.RELEASED,
                    created_at=clock.now(),
                )
                session.add(lease)
                memo.requests_added(POOL, lease.created_at)
            for i in range(ready):
                worker = new_worker(POOL, clock.now() - timedelta(seconds=30 + i))
                worker.state, worker.ready_at = WorkerState.READY, clock.now()
                session.add(worker)
                memo.provisioning_added(POOL, clock.now(), 30.0 + i)
            clock.advance(seconds=step_s)

    def agree() -> None:
        since = clock.now() - timedelta(minutes=30)
        with tx() as session:
            assert memo.requests_since(session, POOL, since) == _requests_since(
                session, POOL, since
            )
            assert memo.provisioned(session, POOL) == _provisioned(session, POOL)

    add(3, 2, 0)  # the newest rows, then more at the same instant
    agree()
    for requests, ready, step_s in [(2, 1, 0), (1, PROVISION_SAMPLES, 60), (4, 3, 600)]:
        add(requests, ready, step_s)
        agree()
    clock.advance(minutes=40)  # every request before the window now
    agree()


def test_the_pools_json_columns_read_as_written_and_a_new_object_each_read(
    tx: Tx, clock: ManualClock
) -> None:
    # Empty objects and lists skip the parser (``db._json_loads``); a caller that changes
    # what it was given must not change what the next read returns.
    other = PoolConfig.model_validate(
        pool_config("hosted-windows", os="windows", capabilities=["docker", "gpu"])
    )
    with tx() as session:
        apply_config(session, [other], clock.now() + timedelta(seconds=1))
    with tx() as session:
        first = {pool.name: pool for pool in pools_by_name(session)}
    assert (first[POOL].options, first[POOL].capabilities) == ({}, [])
    assert first["hosted-windows"].capabilities == ["docker", "gpu"]
    first[POOL].options["changed"] = True
    first[POOL].capabilities.append("changed")
    with tx() as session:
        again = {pool.name: pool for pool in pools_by_name(session)}
    assert (again[POOL].options, again[POOL].capabilities) == ({}, [])
