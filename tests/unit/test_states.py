"""The worker and lease state machines: every allowed move is audited, every other one raises."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, SQLModel, create_engine, select

from service.models import Event, Lease, LeaseState, Pool, Tenant, Worker, WorkerState
from service.states import (
    LEASE_TRANSITIONS,
    WORKER_TRANSITIONS,
    InvalidTransition,
    move_lease,
    move_worker,
)

NOW = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
CREATED = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)

# In the enums' order, not the frozensets': pytest-xdist's processes must collect the
# same ids in the same order, and a set's order follows the per-process string hash.
WORKER_ALLOWED = [(a, b) for a in WorkerState for b in WorkerState if b in WORKER_TRANSITIONS[a]]
WORKER_FORBIDDEN = [
    (a, b) for a in WorkerState for b in WorkerState if b not in WORKER_TRANSITIONS[a]
]
LEASE_ALLOWED = [(a, b) for a in LeaseState for b in LeaseState if b in LEASE_TRANSITIONS[a]]
LEASE_FORBIDDEN = [(a, b) for a in LeaseState for b in LeaseState if b not in LEASE_TRANSITIONS[a]]


def _ids(
    pairs: list[tuple[WorkerState, WorkerState]] | list[tuple[LeaseState, LeaseState]],
) -> list[str]:
    return [f"{a}->{b}" for a, b in pairs]


@pytest.fixture
def session() -> Iterator[Session]:
    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    SQLModel.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(
            Pool(
                name="p",
                os="ubuntu",
                provisioner="fake",
                min_ready=0,
                max_workers=1,
                config_min_ready=0,
                config_max_workers=1,
                lease_idle_timeout_s=60,
                lease_max_lifetime_s=600,
                provision_timeout_s=60,
                pending_timeout_s=60,
            )
        )
        session.add(Tenant(id="t-1", name="acme", token_hash="h", created_at=CREATED))
        session.commit()
        yield session
    engine.dispose()


def _worker(session: Session, state: WorkerState) -> Worker:
    worker = Worker(
        id="w-1",
        pool="p",
        state=state,
        created_at=CREATED,
        state_changed_at=CREATED,
        access_token="wla_x",
    )
    session.add(worker)
    session.commit()
    return worker


def _lease(session: Session, state: LeaseState) -> Lease:
    lease = Lease(id="l-1", tenant_id="t-1", pool="p", state=state, created_at=CREATED)
    session.add(lease)
    session.commit()
    return lease


def _events(session: Session) -> list[Event]:
    return list(session.exec(select(Event)).all())


def test_transition_tables_cover_every_state() -> None:
    assert set(WORKER_TRANSITIONS) == set(WorkerState)
    assert set(LEASE_TRANSITIONS) == set(LeaseState)
    assert WORKER_TRANSITIONS[WorkerState.DESTROYED] == frozenset()
    for ended in (LeaseState.RELEASED, LeaseState.EXPIRED, LeaseState.REVOKED, LeaseState.FAILED):
        assert LEASE_TRANSITIONS[ended] == frozenset()


@pytest.mark.parametrize(("start", "to"), WORKER_ALLOWED, ids=_ids(WORKER_ALLOWED))
def test_allowed_worker_transition_moves_the_row_and_writes_an_event(
    session: Session, start: WorkerState, to: WorkerState
) -> None:
    worker = _worker(session, start)
    move_worker(session, worker, to, "because of a test", NOW)
    session.commit()

    row = session.get(Worker, "w-1", populate_existing=True)
    assert row is not None
    assert (row.state, row.state_changed_at) == (to, NOW)
    [event] = _events(session)
    assert (event.kind, event.subject_id, event.pool) == ("worker", "w-1", "p")
    assert (event.from_state, event.to_state) == (start, to)
    assert (event.reason, event.at) == ("because of a test", NOW)


@pytest.mark.parametrize(("start", "to"), WORKER_FORBIDDEN, ids=_ids(WORKER_FORBIDDEN))
def test_forbidden_worker_transition_raises_and_changes_nothing(
    session: Session, start: WorkerState, to: WorkerState
) -> None:
    worker = _worker(session, start)
    with pytest.raises(InvalidTransition, match=f"{start} -> {to}"):
        move_worker(session, worker, to, "a bug", NOW)
    session.commit()

    row = session.get(Worker, "w-1", populate_existing=True)
    assert row is not None and row.state == start
    assert _events(session) == []


@pytest.mark.parametrize(("start", "to"), LEASE_ALLOWED, ids=_ids(LEASE_ALLOWED))
def test_allowed_lease_transition_moves_the_row_and_writes_an_event(
    session: Session, start: LeaseState, to: LeaseState
) -> None:
    lease = _lease(session, start)
    move_lease(session, lease, to, "because of a test", NOW)
    session.commit()

    row = session.get(Lease, "l-1", populate_existing=True)
    assert row is not None and row.state == to
    [event] = _events(session)
    assert (event.kind, event.subject_id, event.pool, event.tenant_id) == (
        "lease",
        "l-1",
        "p",
        "t-1",
    )
    assert (event.from_state, event.to_state) == (start, to)
    assert (event.reason, event.at) == ("because of a test", NOW)


@pytest.mark.parametrize(("start", "to"), LEASE_FORBIDDEN, ids=_ids(LEASE_FORBIDDEN))
def test_forbidden_lease_transition_raises_and_changes_nothing(
    session: Session, start: LeaseState, to: LeaseState
) -> None:
    lease = _lease(session, start)
    with pytest.raises(InvalidTransition, match=f"{start} -> {to}"):
        move_lease(session, lease, to, "a bug", NOW)
    session.commit()

    row = session.get(Lease, "l-1", populate_existing=True)
    assert row is not None and row.state == start
    assert _events(session) == []
