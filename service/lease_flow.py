"""Requests that span more than one transaction or wake someone up.

A lease request: acquire (one transaction, ``leasing.acquire``); when it has to
wait, hand free workers to the queue at once, ring the scheduler's doorbell so
the refill starts now, and wait for activation without holding a transaction.
A lease that takes a ready worker rings too, so its replacement starts at once.
The agent's ready callback: hand the worker to the queue (one transaction) and
wake the requests of this process that wait for it. Views call one method here.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from contextlib import nullcontext
from dataclasses import dataclass, field

from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from service import leasing
from service.clock import Clock
from service.db import session_scope, transaction
from service.doorbell import Bell, NoBell
from service.leasing import Acquired, Outcome
from service.models import Lease, LeaseState
from service.waiters import Waiters, lease_waiters
from service.wakes import NoRelay, Relay
from service.workers import Ready, worker_ready

log = logging.getLogger(__name__)


@dataclass
class LeaseFlow:
    read_factory: sessionmaker[Session]
    clock: Clock
    bell: Bell = field(default_factory=NoBell)
    max_waits_per_tenant: int = 16
    relay: Relay = field(default_factory=NoRelay)
    waiters: Waiters = field(init=False)

    def __post_init__(self) -> None:
        self.waiters = lease_waiters(
            self._settled, per_tenant=self.max_waits_per_tenant, relay=self.relay
        )

    def _settled(self, lease_ids: Collection[str]) -> set[str]:
        with session_scope(self.read_factory) as session:
            return leasing.settled_leases(session, lease_ids)

    def request(
        self, session: Session, tenant_id: str, pool: str, wait_seconds: int | None
    ) -> Acquired:
        """Lease a worker: active now, pending (after waiting up to ``wait_seconds``), or
        the live lease the tenant already holds. Each step commits on ``session``.

        A request that may wait takes one of its tenant's waiting slots first (429 when
        none is free), so one tenant cannot hold every waiting request.
        """
        with self.waiters.slot(tenant_id) if wait_seconds else nullcontext():
            return self._request(session, tenant_id, pool, wait_seconds)

    def _request(
        self, session: Session, tenant_id: str, pool: str, wait_seconds: int | None
    ) -> Acquired:
        with transaction(session):
            acquired = leasing.acquire(session, tenant_id, pool, self.clock.now())
        if acquired.outcome == Outcome.ACTIVE:
            # A ready worker was taken: its replacement starts now, not at the next full
            # pass (a datagram or a NOTIFY after the commit; the answer does not wait).
            self.bell.ring()
            return acquired
        if acquired.outcome != Outcome.PENDING:
            return acquired  # the lease already held: answered at once
        acquired = self._serve_queue_now(session, acquired)
        if acquired.lease.state != LeaseState.PENDING:
            return acquired
        self.bell.ring()  # the scheduler refills now, not at its next poll
        if not wait_seconds:
            return acquired
        log.info(
            "lease_waiting lease=%s pool=%s tenant=%s wait_s=%d",
            acquired.lease.id,
            pool,
            tenant_id,
            wait_seconds,
        )
        self.waiters.wait(acquired.lease.id, wait_seconds)
        with transaction(session):
            lease = session.get(Lease, acquired.lease.id, populate_existing=True)
            assert lease is not None
        log.info("lease_wait_ended lease=%s state=%s", lease.id, lease.state)
        activated = lease.state != LeaseState.PENDING
        return Acquired(lease, Outcome.ACTIVE if activated else Outcome.PENDING)

    def await_lease(
        self, session: Session, tenant_id: str, lease_id: str, wait_seconds: int | None
    ) -> Lease:
        """The tenant's lease; a pending one is waited on for up to ``wait_seconds``."""
        with transaction(session):
            lease = leasing.tenant_lease(session, tenant_id, lease_id)
        if lease.state != LeaseState.PENDING or not wait_seconds:
            return lease
        with self.waiters.slot(tenant_id):
            self.waiters.wait(lease_id, wait_seconds)
        with transaction(session):
            refreshed = session.get(Lease, lease_id, populate_existing=True)
            assert refreshed is not None
        return refreshed

    def worker_ready(
        self,
        session: Session,
        worker_id: str,
        bootstrap_token: str,
        agent_url: str,
        address: str | None,
    ) -> Ready:
        """The agent is up: the worker is ready (or leased at once)."""
        with transaction(session):
            ready = worker_ready(
                session, worker_id, bootstrap_token, agent_url, address, self.clock.now()
            )
        self.waiters.notify([lease.id for lease in ready.activated])
        return ready

    def _serve_queue_now(self, session: Session, acquired: Acquired) -> Acquired:
        """Hand free ready workers to the queue at once, not at the next scheduler run.

        Under contention (PostgreSQL, SKIP LOCKED) a request may have found every ready
        worker locked by transactions that then rolled back.
        """
        with transaction(session):
            activated = leasing.serve_pending_of(session, acquired.lease.pool, self.clock.now())
        self.waiters.notify([lease.id for lease in activated])
        for lease in activated:
            if lease.id == acquired.lease.id:
                return Acquired(lease, Outcome.ACTIVE)
        return acquired
