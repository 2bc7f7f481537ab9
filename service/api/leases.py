"""Tenant leases: ``/v1/leases``."""

from __future__ import annotations

from typing import Any

from flask import g, url_for
from flask_openapi3 import APIBlueprint

from service import leasing, listing
from service.api import BEARER, TENANT_TAG, problems, svc
from service.api.present import lease_out, leases_out
from service.auth import require_tenant
from service.leasing import Outcome
from service.models import LeaseState
from service.schemas import (
    LeaseCreate,
    LeaseList,
    LeaseOut,
    LeasePath,
    LeaseStateFilter,
    LeaseWait,
)

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


@bp.post("", responses={200: LeaseOut, 201: LeaseOut, 202: LeaseOut, **problems(404, 429)})
def create_lease(body: LeaseCreate) -> Any:
    """Lease a worker: 201 active, 202 pending, 200 the live lease you already hold."""
    services = svc()
    acquired = services.flow.request(services.session(), g.tenant.id, body.pool, body.wait_seconds)
    with services.transaction() as session:
        # The warm path's rows are still in the session: presenting them reads nothing.
        out = lease_out(session, acquired.lease, viewer_tenant_id=g.tenant.id)
    headers = {"Location": url_for("leases.get_lease", lease_id=out.id)}
    if out.state == LeaseState.PENDING:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return out.model_dump(mode="json"), STATUS[acquired.outcome], headers


@bp.get("", responses={200: LeaseList})
def list_leases(query: LeaseStateFilter) -> Any:
    """Your leases, newest first: live ones by default, ``?state=all`` for every one; a page
    of ``limit`` from ``offset``, and ``next_offset`` while there may be more."""
    session = svc().session()
    leases = listing.leases_page(
        session,
        tenant_id=g.tenant.id,
        pool=None,
        state=query.state,
        limit=query.limit,
        offset=query.offset,
    )
    return LeaseList(
        leases=leases_out(session, leases, viewer_tenant_id=g.tenant.id),
        next_offset=query.next_offset(len(leases)),
    ).model_dump(mode="json")


@bp.get("/<lease_id>", responses={200: LeaseOut, **problems(404, 429)})
def get_lease(path: LeasePath, query: LeaseWait) -> Any:
    """Your lease; ``?wait_seconds=N`` waits up to N s while it is pending (a long poll)."""
    services = svc()
    lease = services.flow.await_lease(
        services.session(), g.tenant.id, path.lease_id, query.wait_seconds
    )
    return lease_out(services.session(), lease, viewer_tenant_id=g.tenant.id).model_dump(
        mode="json"
    )


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
