"""Requests that span more than one transaction or wake someone up.

A lease request: acquire (one transaction, ``leasing.acquire``); when it has to
wait, hand free workers to the queue at once, ring the scheduler's doorbell so
the refill starts now, and wait for activation without holding a transaction.
The agent's ready callback: hand the worker to the queue (one transaction) and
wake the requests of this process that wait for it. Views call one method here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlmodel import Session

from service import leasing
from service.clock import Clock
from service.db import transaction
from service.doorbell import Bell, NoBell
from service.leasing import Acquired, Outcome
from service.models import Lease, LeaseState
from service.waiters import LeaseWaiters
from service.workers import worker_ready


@dataclass
class LeaseFlow:
    clock: Clock
    bell: Bell = field(default_factory=NoBell)
    waiters: LeaseWaiters = field(default_factory=LeaseWaiters)

    def request(
        self, session: Session, tenant_id: str, pool: str, wait_seconds: int | None
    ) -> Acquired:
        """Lease a worker: active now, pending (after waiting up to ``wait_seconds``), or
        the live lease the tenant already holds. Each step commits on ``session``."""
        with transaction(session):
            acquired = leasing.acquire(session, tenant_id, pool, self.clock.now())
        if acquired.lease.state != LeaseState.PENDING:
            return acquired
        if acquired.outcome == Outcome.PENDING:
            acquired = self._serve_queue_now(session, acquired)
            if acquired.lease.state != LeaseState.PENDING:
                return acquired
        self.bell.ring()  # the scheduler refills now, not at its next poll
        if not wait_seconds:
            return acquired
        lease = self._wait_for_activation(session, acquired.lease.id, wait_seconds)
        activated_now = lease.state != LeaseState.PENDING and acquired.outcome == Outcome.PENDING
        return Acquired(lease, Outcome.ACTIVE if activated_now else acquired.outcome)

    def worker_ready(
        self,
        session: Session,
        worker_id: str,
        bootstrap_token: str,
        agent_url: str,
        address: str | None,
    ) -> str:
        """The agent is up: the worker is ready (or leased at once). Returns its access token."""
        with transaction(session):
            worker, activated = worker_ready(
                session, worker_id, bootstrap_token, agent_url, address, self.clock.now()
            )
            access_token = worker.access_token
        if activated:
            self.waiters.notify()
        return access_token

    def _serve_queue_now(self, session: Session, acquired: Acquired) -> Acquired:
        """Hand free ready workers to the queue at once, not at the next scheduler run.

        Under contention (PostgreSQL, SKIP LOCKED) a request may have found every ready
        worker locked by transactions that then rolled back.
        """
        with transaction(session):
            activated = leasing.serve_pending_of(session, acquired.lease.pool, self.clock.now())
        if activated:
            self.waiters.notify()
        for lease in activated:
            if lease.id == acquired.lease.id:
                return Acquired(lease, Outcome.ACTIVE)
        return acquired

    def _wait_for_activation(self, session: Session, lease_id: str, wait_seconds: int) -> Lease:
        latest: dict[str, Lease] = {}

        def settled() -> bool:
            with transaction(session):
                lease = session.get(Lease, lease_id, populate_existing=True)
                assert lease is not None
                latest["lease"] = lease
                return lease.state != LeaseState.PENDING

        self.waiters.wait(settled, wait_seconds)
        return latest["lease"]
