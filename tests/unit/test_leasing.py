"""Leasing in the domain: acquire, the queue, release and expiry, one transaction each."""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import select

from service.leasing import Outcome, acquire, expire, release, serve_pending, serve_pending_of
from service.models import EndReason, Lease, LeaseState, Pool, Worker, WorkerState
from tests.support.fakes import ManualClock
from tests.unit.conftest import Tx, add_ready_worker, add_tenant

POOL = "hosted-ubuntu"


def test_acquire_hands_out_the_oldest_ready_worker_and_leases_it(
    tx: Tx, clock: ManualClock
) -> None:
    t_1 = add_tenant(tx, clock.now())
    with tx() as session:
        oldest = add_ready_worker(session, POOL, clock.now()).id
        clock.advance(seconds=1)
        add_ready_worker(session, POOL, clock.now())
    with tx() as session:
        acquired = acquire(session, t_1, POOL, clock.now())
    assert acquired.outcome == Outcome.ACTIVE
    with tx() as session:
        lease = session.get(Lease, acquired.lease.id)
        worker = session.get(Worker, oldest)
        assert lease is not None and worker is not None
        assert (lease.state, lease.worker_id) == (LeaseState.ACTIVE, oldest)
        assert worker.state == WorkerState.LEASED
        assert lease.idle_expires_at == clock.now() + timedelta(minutes=60)
        assert lease.expires_at == clock.now() + timedelta(hours=72)


def test_acquire_without_a_ready_worker_queues_a_pending_lease(tx: Tx, clock: ManualClock) -> None:
    t_1 = add_tenant(tx, clock.now())
    with tx() as session:
        acquired = acquire(session, t_1, POOL, clock.now())
    assert acquired.outcome == Outcome.PENDING
    assert acquired.lease.worker_id is None
    assert acquired.lease.pending_expires_at == clock.now() + timedelta(minutes=30)


def test_a_second_acquire_returns_the_live_lease_the_tenant_holds(
    tx: Tx, clock: ManualClock
) -> None:
    t_1 = add_tenant(tx, clock.now())
    with tx() as session:
        add_ready_worker(session, POOL, clock.now())
        add_ready_worker(session, POOL, clock.now())
    with tx() as session:
        first = acquire(session, t_1, POOL, clock.now())
    with tx() as session:
        second = acquire(session, t_1, POOL, clock.now())
    assert second.outcome == Outcome.EXISTING
    assert second.lease.id == first.lease.id
    with tx() as session:
        states = session.exec(select(Worker.state)).all()
    assert sorted(states) == [WorkerState.LEASED, WorkerState.READY]


def test_a_newcomer_queues_behind_a_pending_lease_even_when_a_worker_comes_free(
    tx: Tx, clock: ManualClock
) -> None:
    t_early = add_tenant(tx, clock.now())
    t_late = add_tenant(tx, clock.now())
    with tx() as session:
        waiting = acquire(session, t_early, POOL, clock.now()).lease.id
    clock.advance(seconds=1)
    with tx() as session:
        add_ready_worker(session, POOL, clock.now())
    with tx() as session:
        late = acquire(session, t_late, POOL, clock.now())
    assert late.outcome == Outcome.PENDING
    with tx() as session:
        pool = session.get(Pool, POOL)
        assert pool is not None
        served = serve_pending(session, pool, clock.now())
    assert [lease.id for lease in served] == [waiting]


def test_serving_a_pool_by_name_waits_for_a_ready_worker_then_sets_the_lease_clocks(
    tx: Tx, clock: ManualClock
) -> None:
    # The pool's settings come from a Core look of four columns, not its ORM row.
    tenant = add_tenant(tx, clock.now())
    with tx() as session:
        waiting = acquire(session, tenant, POOL, clock.now()).lease.id
    with tx() as session:
        assert serve_pending_of(session, POOL, clock.now()) == []  # no worker ready yet
    clock.advance(seconds=40)
    with tx() as session:
        worker_id = add_ready_worker(session, POOL, clock.now()).id
    with tx() as session:
        [served] = serve_pending_of(session, POOL, clock.now())
        pool = session.get(Pool, POOL)
        assert pool is not None
        assert (served.id, served.worker_id, served.activated_at) == (
            waiting,
            worker_id,
            clock.now(),
        )
        assert served.idle_expires_at == clock.now() + timedelta(seconds=pool.lease_idle_timeout_s)
        assert served.expires_at == clock.now() + timedelta(seconds=pool.lease_max_lifetime_s)


def test_release_destroys_the_worker_and_is_idempotent(tx: Tx, clock: ManualClock) -> None:
    t_1 = add_tenant(tx, clock.now())
    with tx() as session:
        worker_id = add_ready_worker(session, POOL, clock.now()).id
    with tx() as session:
        lease_id = acquire(session, t_1, POOL, clock.now()).lease.id
    for _ in range(2):
        with tx() as session:
            lease = release(session, t_1, lease_id, clock.now())
            assert (lease.state, lease.end_reason) == (LeaseState.RELEASED, EndReason.RELEASED)
    with tx() as session:
        worker = session.get(Worker, worker_id)
        assert worker is not None and worker.state == WorkerState.DESTROYING


def test_expire_ends_idle_leases_and_pending_leases_past_their_timeouts(
    tx: Tx, clock: ManualClock
) -> None:
    t_idle = add_tenant(tx, clock.now())
    t_pending = add_tenant(tx, clock.now())
    with tx() as session:
        add_ready_worker(session, POOL, clock.now())
    with tx() as session:
        idle = acquire(session, t_idle, POOL, clock.now()).lease.id
        pending = acquire(session, t_pending, POOL, clock.now()).lease.id
    clock.advance(minutes=29)
    with tx() as session:
        assert expire(session, clock.now()) == 0
    clock.advance(minutes=1)  # the pending lease's 30 minutes are up
    with tx() as session:
        assert expire(session, clock.now()) == 1
    clock.advance(minutes=30)  # the active lease's 60 idle minutes are up
    with tx() as session:
        assert expire(session, clock.now()) == 1
    with tx() as session:
        idle_row, pending_row = session.get(Lease, idle), session.get(Lease, pending)
        assert idle_row is not None and pending_row is not None
        assert (idle_row.state, idle_row.end_reason) == (
            LeaseState.EXPIRED,
            EndReason.IDLE_TIMEOUT,
        )
        assert (pending_row.state, pending_row.end_reason) == (LeaseState.FAILED, EndReason.FAILED)
