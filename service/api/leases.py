"""Tenant leases: ``/v1/leases``."""

from __future__ import annotations

from typing import Any

from flask import g, url_for
from flask_openapi3 import APIBlueprint
from sqlmodel import col, select

from service import leasing
from service.api import BEARER, TENANT_TAG, by_state, problems, svc
from service.api.present import lease_out, leases_out
from service.auth import require_tenant
from service.leasing import Outcome
from service.models import LIVE_LEASE_STATES, Lease, LeaseState
from service.schemas import LeaseCreate, LeaseList, LeaseOut, LeasePath, LeaseStateFilter

bp = APIBlueprint(
    "leases",
    __name__,
    url_prefix="/v1/leases",
    abp_tags=[TENANT_TAG],
    abp_security=BEARER,
    abp_responses=problems(401, 403, 413, 422, 503),
)
bp.before_request(require_tenant)

RETRY_AFTER_S = 2
STATUS = {Outcome.ACTIVE: 201, Outcome.PENDING: 202, Outcome.EXISTING: 200}


@bp.post("", responses={200: LeaseOut, 201: LeaseOut, 202: LeaseOut, **problems(404)})
def create_lease(body: LeaseCreate) -> Any:
    """Lease a worker: 201 active, 202 pending, 200 the live lease you already hold."""
    services = svc()
    tenant_id = g.tenant.id
    with services.transaction() as session:
        acquired = leasing.acquire(session, tenant_id, body.pool, services.clock.now())
        if acquired.lease.state != LeaseState.PENDING:
            # The warm path answers from the rows this transaction holds: no second one.
            out = lease_out(session, acquired.lease, viewer_tenant_id=tenant_id)
            return _lease_answer(out, acquired.outcome)
    if acquired.outcome == Outcome.PENDING:
        acquired = _serve_queue_now(acquired, body.pool)
    lease = acquired.lease
    if lease.state == LeaseState.PENDING:
        services.bell.ring()  # the scheduler refills now, not at its next poll
    if lease.state == LeaseState.PENDING and body.wait_seconds:
        lease = _wait_for_activation(lease.id, body.wait_seconds)
        if lease.state != LeaseState.PENDING and acquired.outcome == Outcome.PENDING:
            acquired = leasing.Acquired(lease, Outcome.ACTIVE)
    with services.transaction() as session:
        out = lease_out(session, lease, viewer_tenant_id=tenant_id)
    return _lease_answer(out, acquired.outcome)


def _lease_answer(out: LeaseOut, outcome: Outcome) -> Any:
    headers = {"Location": url_for("leases.get_lease", lease_id=out.id)}
    if out.state == LeaseState.PENDING:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return out.model_dump(mode="json"), STATUS[outcome], headers


def _serve_queue_now(acquired: leasing.Acquired, pool: str) -> leasing.Acquired:
    """Hand free ready workers to the queue at once, not at the next scheduler run.

    Under contention (PostgreSQL, SKIP LOCKED) a request may have found every ready
    worker locked by transactions that then rolled back.
    """
    services = svc()
    with services.transaction() as session:
        activated = leasing.serve_pending_of(session, pool, services.clock.now())
    if activated:
        services.waiters.notify()
    for lease in activated:
        if lease.id == acquired.lease.id:
            return leasing.Acquired(lease, Outcome.ACTIVE)
    return acquired


def _wait_for_activation(lease_id: str, wait_seconds: int) -> Lease:
    services = svc()
    latest: dict[str, Lease] = {}

    def settled() -> bool:
        with services.transaction() as session:
            lease = session.get(Lease, lease_id, populate_existing=True)
            assert lease is not None
            latest["lease"] = lease
            return lease.state != LeaseState.PENDING

    services.waiters.wait(settled, wait_seconds)
    return latest["lease"]


@bp.get("", responses={200: LeaseList})
def list_leases(query: LeaseStateFilter) -> Any:
    """Your leases: live ones by default, ``?state=all`` for every one."""
    session = svc().session()
    statement = select(Lease).where(Lease.tenant_id == g.tenant.id)
    statement = by_state(statement, Lease.state, query.state, LIVE_LEASE_STATES)
    leases = session.exec(statement.order_by(col(Lease.created_at).desc()).limit(1000)).all()
    return LeaseList(leases=leases_out(session, leases, viewer_tenant_id=g.tenant.id)).model_dump(
        mode="json"
    )


@bp.get("/<lease_id>", responses={200: LeaseOut, **problems(404)})
def get_lease(path: LeasePath) -> Any:
    session = svc().session()
    lease = leasing.tenant_lease(session, g.tenant.id, path.lease_id)
    return lease_out(session, lease, viewer_tenant_id=g.tenant.id).model_dump(mode="json")


@bp.post("/<lease_id>/renew", responses={200: LeaseOut, **problems(404, 409)})
def renew_lease(path: LeasePath) -> Any:
    """Push the idle deadline out; the maximum lifetime does not move."""
    services = svc()
    with services.transaction() as session:
        lease = leasing.renew(session, g.tenant.id, path.lease_id, services.clock.now())
        return lease_out(session, lease, viewer_tenant_id=g.tenant.id).model_dump(mode="json")


@bp.delete("/<lease_id>", responses={200: LeaseOut, **problems(404)})
def release_lease(path: LeasePath) -> Any:
    """Release: the worker is destroyed in the background and never handed out again."""
    services = svc()
    with services.transaction() as session:
        lease = leasing.release(session, g.tenant.id, path.lease_id, services.clock.now())
        return lease_out(session, lease, viewer_tenant_id=g.tenant.id).model_dump(mode="json")
