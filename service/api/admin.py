"""Operator endpoints: ``/v1/admin/...`` (admin token)."""

from __future__ import annotations

from typing import Any

from flask_openapi3 import APIBlueprint

from service import leasing, listing, tenants, workers
from service.api import ADMIN_TAG, BEARER, problems, svc
from service.api.pools import pool_out
from service.api.present import leases_out
from service.auth import require_admin
from service.capacity import Target
from service.models import LIVE_WORKER_STATES, Pool, Worker
from service.pools import PoolCounts, patch_pool, warm_targets
from service.schemas import (
    AdminLeaseQuery,
    AdminPoolList,
    AdminPoolOut,
    AdminWorkerList,
    AdminWorkerOut,
    AdminWorkerQuery,
    EventList,
    EventOut,
    EventQuery,
    LeaseList,
    LeaseOut,
    LeasePath,
    Page,
    PoolPatch,
    PoolPath,
    TenantCreate,
    TenantCreated,
    TenantList,
    TenantOut,
    TenantPath,
    WarmTargetOut,
    WorkerPath,
)

bp = APIBlueprint(
    "admin",
    __name__,
    url_prefix="/v1/admin",
    abp_tags=[ADMIN_TAG],
    abp_security=BEARER,
    abp_responses=problems(401, 403, 413, 422, 503),
)
bp.before_request(require_admin)


def _next_offset(page: Page, returned: int) -> int | None:
    return page.offset + returned if returned == page.limit else None


# ---- tenants ----------------------------------------------------------------------


@bp.post("/tenants", responses={201: TenantCreated})
def create_tenant(body: TenantCreate) -> Any:
    """Create a tenant; its token is shown in this answer only."""
    services = svc()
    with services.transaction() as session:
        tenant, token = tenants.create(session, body.name, services.clock.now())
        out = TenantCreated(
            id=tenant.id, name=tenant.name, token=token, created_at=tenant.created_at
        )
    return out.model_dump(mode="json"), 201


@bp.get("/tenants", responses={200: TenantList})
def list_tenants(query: Page) -> Any:
    session = svc().session()
    rows = tenants.page(session, query.limit, query.offset)
    return TenantList(
        tenants=[TenantOut.model_validate(t, from_attributes=True) for t in rows],
        next_offset=_next_offset(query, len(rows)),
    ).model_dump(mode="json")


@bp.delete("/tenants/<tenant_id>", responses={200: TenantOut, **problems(404)})
def disable_tenant(path: TenantPath) -> Any:
    """Disable the tenant: its token stops working and its leases end."""
    services = svc()
    with services.transaction() as session:
        tenant = tenants.disable(session, path.tenant_id, services.clock.now())
        return TenantOut.model_validate(tenant, from_attributes=True).model_dump(mode="json")


# ---- pools ------------------------------------------------------------------------


@bp.get("/pools", responses={200: AdminPoolList})
def list_pools() -> Any:
    """Every pool with its settings and counts per worker state and pending leases."""
    rows = listing.pools_with_targets(svc().session(), svc().clock.now())
    return AdminPoolList(pools=[_admin_pool(p, c, t) for p, c, t in rows]).model_dump(mode="json")


@bp.patch("/pools/<name>", responses={200: AdminPoolOut, **problems(404)})
def update_pool(path: PoolPath, body: PoolPatch) -> Any:
    """Change min_ready / max_workers / enabled; the scheduler acts on its next run."""
    services = svc()
    with services.transaction() as session:
        pool = patch_pool(session, path.name, body, services.clock.now())
        counts = listing.pool_counts(session, pool.name)
        target = warm_targets(session, [pool], services.clock.now())[pool.name]
        return _admin_pool(pool, counts, target).model_dump(mode="json")


def _admin_pool(pool: Pool, counts: PoolCounts, target: Target | None = None) -> AdminPoolOut:
    counted = {str(state): counts.by_state.get(state, 0) for state in LIVE_WORKER_STATES}
    counted["pending_leases"] = counts.pending_leases
    return AdminPoolOut(
        **pool_out(pool).model_dump(),
        provisioner=pool.provisioner,
        enabled=pool.enabled,
        min_ready=pool.min_ready,
        max_workers=pool.max_workers,
        provision_timeout_s=pool.provision_timeout_s,
        pending_timeout_s=pool.pending_timeout_s,
        degraded_reason=pool.degraded_reason,
        destroy_error=pool.destroy_error,
        warning=pool.warning,
        counts=counted,
        warm=None if target is None else _warm_out(pool, target),
    )


def _warm_out(pool: Pool, target: Target) -> WarmTargetOut:
    return WarmTargetOut(
        policy=target.policy,
        target=target.ready,
        keep=target.keep,
        min_ready=target.min_ready,
        schedule_min_ready=target.schedule_min_ready,
        schedule=target.schedule,
        rate_per_min=target.rate_per_min,
        provision_mean_s=target.provision_mean_s,
        demand_target=target.demand_ready,
        hit_target=pool.warm_hit_target,
        reason=target.reason,
    )


# ---- workers ----------------------------------------------------------------------


@bp.get("/workers", responses={200: AdminWorkerList})
def list_workers(query: AdminWorkerQuery) -> Any:
    rows = listing.workers_page(svc().session(), query.pool, query.state, query.limit, query.offset)
    return AdminWorkerList(
        workers=[_admin_worker(w, lease_id) for w, lease_id in rows],
        next_offset=_next_offset(query, len(rows)),
    ).model_dump(mode="json")


@bp.delete("/workers/<worker_id>", responses={200: AdminWorkerOut, **problems(404)})
def destroy_worker(path: WorkerPath) -> Any:
    """Destroy the worker now (its lease, if any, is revoked)."""
    services = svc()
    with services.transaction() as session:
        worker, lease_id = workers.destroy_by_operator(
            session, path.worker_id, services.clock.now()
        )
        return _admin_worker(worker, lease_id).model_dump(mode="json")


def _admin_worker(worker: Worker, lease_id: str | None) -> AdminWorkerOut:
    return AdminWorkerOut(
        **worker.model_dump(include=set(AdminWorkerOut.model_fields) - {"lease_id"}),
        lease_id=lease_id,
    )


# ---- leases -----------------------------------------------------------------------


@bp.get("/leases", responses={200: LeaseList})
def list_leases(query: AdminLeaseQuery) -> Any:
    session = svc().session()
    rows = listing.leases_page(
        session,
        tenant_id=query.tenant,
        pool=query.pool,
        state=query.state,
        limit=query.limit,
        offset=query.offset,
    )
    return LeaseList(
        leases=leases_out(session, rows, viewer_tenant_id=None),
        next_offset=_next_offset(query, len(rows)),
    ).model_dump(mode="json")


@bp.delete("/leases/<lease_id>", responses={200: LeaseOut, **problems(404)})
def revoke_lease(path: LeasePath) -> Any:
    services = svc()
    with services.transaction() as session:
        lease = leasing.revoke_lease(
            session, path.lease_id, services.clock.now(), "revoked by operator"
        )
        return leases_out(session, [lease], viewer_tenant_id=None)[0].model_dump(mode="json")


# ---- audit log --------------------------------------------------------------------


@bp.get("/events", responses={200: EventList})
def list_events(query: EventQuery) -> Any:
    """The audit log, newest first; pass ``next_before`` as ``before`` for the next page."""
    rows = listing.events_page(svc().session(), query.before, query.limit)
    events = [EventOut.model_validate(e, from_attributes=True) for e in rows]
    next_before = rows[-1].id if len(rows) == query.limit else None
    return EventList(events=events, next_before=next_before).model_dump(mode="json")
