"""Workers in the domain: the ready callback, recorded destroy results, timeouts and health."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import col, select

from service.errors import Unauthorized
from service.leasing import acquire, schedule_destroy
from service.models import Event, Lease, LeaseState, Pool, Worker, WorkerState
from service.pools import new_worker
from service.security import hash_token
from service.workers import (
    MAX_DESTROY_BACKOFF_S,
    CallFailure,
    destroy_by_operator,
    destroy_retry_delay,
    health_change,
    provision_timeouts,
    record_destroys,
    worker_ready,
)
from tests.support.fakes import ManualClock
from tests.unit.conftest import Tx, add_ready_worker, add_tenant

POOL = "hosted-ubuntu"
TRANSIENT = CallFailure("TransientProvisionerError", "daemon restarting", permanent=False)
PERMANENT = CallFailure("PermanentProvisionerError", "access denied", permanent=True)


def _provisioning(tx: Tx, clock: ManualClock) -> tuple[str, str]:
    with tx() as session:
        worker = new_worker(POOL, clock.now())
        session.add(worker)
        return worker.id, worker.bootstrap_token or ""


def _destroying(tx: Tx, clock: ManualClock) -> str:
    with tx() as session:
        worker = add_ready_worker(session, POOL, clock.now())
        schedule_destroy(session, worker, "test", clock.now())
        return worker.id


def test_the_bootstrap_token_works_once_and_an_unknown_worker_looks_the_same(
    tx: Tx, clock: ManualClock
) -> None:
    worker_id, token = _provisioning(tx, clock)
    with tx() as session, pytest.raises(Unauthorized):
        worker_ready(session, worker_id, "wlb_wrong", "http://x/", None, clock.now())
    with tx() as session:
        ready = worker_ready(session, worker_id, token, "http://x/", None, clock.now())
        assert ready.activated == []
        assert ready.worker_token.startswith("wlw_")
    with tx() as session:
        worker = session.get(Worker, worker_id)
        assert worker is not None and worker.state == WorkerState.READY
        assert ready.access_token == worker.access_token
        assert worker.bootstrap_token is None
        assert worker.worker_token_hash == hash_token(ready.worker_token)  # only its hash
    with tx() as session, pytest.raises(Unauthorized):
        worker_ready(session, worker_id, token, "http://x/", None, clock.now())
    with tx() as session, pytest.raises(Unauthorized) as unknown:
        worker_ready(session, "w-nobody", token, "http://x/", None, clock.now())
    with tx() as session, pytest.raises(Unauthorized) as wrong:
        worker_ready(session, worker_id, "wlb_wrong", "http://x/", None, clock.now())
    assert unknown.value.detail == wrong.value.detail  # no oracle of which ids exist


def test_a_worker_loaded_earlier_in_the_transaction_reads_as_ready_after_the_callback(
    tx: Tx, clock: ManualClock
) -> None:
    # The callback moves the worker in Core: an ORM copy already in the session is
    # expired, so what the rest of the transaction reads of it is the new row.
    worker_id, token = _provisioning(tx, clock)
    with tx() as session:
        loaded = session.get(Worker, worker_id)
        assert loaded is not None and loaded.state == WorkerState.PROVISIONING
        worker_ready(session, worker_id, token, "http://x/", None, clock.now())
        assert loaded.state == WorkerState.READY


def test_a_ready_callback_hands_the_worker_to_the_oldest_pending_lease(
    tx: Tx, clock: ManualClock
) -> None:
    tenant = add_tenant(tx, clock.now())
    with tx() as session:
        lease_id = acquire(session, tenant, POOL, clock.now()).lease.id
    worker_id, token = _provisioning(tx, clock)
    with tx() as session:
        ready = worker_ready(session, worker_id, token, "http://x/", None, clock.now())
        assert [lease.id for lease in ready.activated] == [lease_id]
    with tx() as session:
        worker = session.get(Worker, worker_id)
        assert worker is not None and worker.state == WorkerState.LEASED


def test_a_confirmed_destroy_finishes_the_worker(tx: Tx, clock: ManualClock) -> None:
    worker_id = _destroying(tx, clock)
    with tx() as session:
        assert record_destroys(session, POOL, {worker_id: None}, clock.now()) == 1
    with tx() as session:
        worker = session.get(Worker, worker_id)
        assert worker is not None and worker.state == WorkerState.DESTROYED


def test_a_transient_destroy_failure_is_retried_with_growing_jittered_delays(
    tx: Tx, clock: ManualClock
) -> None:
    worker_id = _destroying(tx, clock)
    waits = []
    for _ in range(3):
        with tx() as session:
            assert record_destroys(session, POOL, {worker_id: TRANSIENT}, clock.now()) == 0
        with tx() as session:
            worker = session.get(Worker, worker_id)
            assert worker is not None and worker.next_attempt_at is not None
            assert worker.state == WorkerState.DESTROYING
            waits.append((worker.next_attempt_at - clock.now()).total_seconds())
    for attempt, waited in enumerate(waits, start=1):
        assert 2**attempt * 0.5 <= waited <= 2**attempt
    with tx() as session:
        pool = session.get(Pool, POOL)
        assert pool is not None and pool.destroy_error is None


def test_a_permanent_destroy_failure_marks_the_pool_and_a_later_success_clears_it(
    tx: Tx, clock: ManualClock
) -> None:
    stuck, other = _destroying(tx, clock), _destroying(tx, clock)
    with tx() as session:
        record_destroys(session, POOL, {stuck: PERMANENT}, clock.now())
    with tx() as session:
        pool = session.get(Pool, POOL)
        worker = session.get(Worker, stuck)
        assert pool is not None and worker is not None
        assert pool.destroy_error == "PermanentProvisionerError: access denied"
        assert worker.state == WorkerState.DESTROYING  # never given up on: it may leak
        assert worker.next_attempt_at is not None
        waited = (worker.next_attempt_at - clock.now()).total_seconds()
        assert MAX_DESTROY_BACKOFF_S / 2 <= waited <= MAX_DESTROY_BACKOFF_S
        reasons = session.exec(select(Event.reason).where(Event.subject_id == stuck)).all()
        assert any("destroy failed permanently" in reason for reason in reasons)
    with tx() as session:
        record_destroys(session, POOL, {other: None}, clock.now())
    with tx() as session:
        pool = session.get(Pool, POOL)
        assert pool is not None and pool.destroy_error is None


def test_retry_delays_never_exceed_the_cap() -> None:
    for attempts in (1, 5, 10, 50):
        assert destroy_retry_delay(attempts, permanent=False) <= MAX_DESTROY_BACKOFF_S
    assert destroy_retry_delay(1, permanent=True) >= MAX_DESTROY_BACKOFF_S / 2


def test_a_worker_not_ready_within_the_provision_timeout_fails_and_is_destroyed(
    tx: Tx, clock: ManualClock
) -> None:
    worker_id, _ = _provisioning(tx, clock)
    clock.advance(minutes=9)
    with tx() as session:
        provision_timeouts(session, clock.now())
    clock.advance(minutes=1)
    with tx() as session:
        assert provision_timeouts(session, clock.now()) == 1
    with tx() as session:
        worker = session.get(Worker, worker_id)
        assert worker is not None and worker.state == WorkerState.DESTROYING
        moves = session.exec(
            select(Event.to_state).where(Event.subject_id == worker_id).order_by(col(Event.id))
        ).all()
        assert moves[-2:] == [WorkerState.FAILED, WorkerState.DESTROYING]


@pytest.mark.parametrize(
    ("state", "gone", "running", "ready_when_running", "change"),
    [
        (WorkerState.LEASED, True, False, False, WorkerState.FAILED),
        (WorkerState.READY, True, False, False, WorkerState.FAILED),
        (WorkerState.DESTROYING, True, False, False, None),  # already on its way out
        (WorkerState.PROVISIONING, False, True, True, WorkerState.READY),
        (WorkerState.PROVISIONING, False, True, False, None),  # waits for its agent
        (WorkerState.READY, False, True, True, None),
    ],
)
def test_health_change_follows_what_the_provisioner_saw(
    state: WorkerState,
    gone: bool,
    running: bool,
    ready_when_running: bool,
    change: WorkerState | None,
) -> None:
    assert health_change(state, gone, running, ready_when_running) == change


def test_an_operator_destroying_a_leased_worker_revokes_its_lease(
    tx: Tx, clock: ManualClock
) -> None:
    tenant = add_tenant(tx, clock.now())
    with tx() as session:
        add_ready_worker(session, POOL, clock.now())
    with tx() as session:
        acquired = acquire(session, tenant, POOL, clock.now())
        worker_id, lease_id = acquired.lease.worker_id, acquired.lease.id
    assert worker_id is not None
    with tx() as session:
        worker, found = destroy_by_operator(session, worker_id, clock.now() + timedelta(1))
        assert (worker.state, found) == (WorkerState.DESTROYING, lease_id)
    with tx() as session:
        lease = session.get(Lease, lease_id)
        assert lease is not None and lease.state == LeaseState.REVOKED
