"""Operator endpoints: ``/v1/admin/...`` (admin token)."""

from __future__ import annotations

from typing import Any

from flask_openapi3 import APIBlueprint
from sqlmodel import col, select

from service import leasing, tenants
from service.api import ADMIN_TAG, BEARER, by_state, problems, svc
from service.api.pools import pool_out
from service.api.present import leases_out
from service.auth import require_admin
from service.errors import NotFound
from service.models import LIVE_LEASE_STATES, LIVE_WORKER_STATES, Event, Lease, Pool, Worker
from service.pools import PoolCounts, counts_by_pool, patch_pool
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
    WorkerPath,
)
from service.workers import fail_worker

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
    session = svc().session()
    counts = counts_by_pool(session)
    pools = session.exec(select(Pool).order_by(col(Pool.name))).all()
    return AdminPoolList(pools=[_admin_pool(p, counts.get(p.name)) for p in pools]).model_dump(
        mode="json"
    )


@bp.patch("/pools/<name>", responses={200: AdminPoolOut, **problems(404)})
def update_pool(path: PoolPath, body: PoolPatch) -> Any:
    """Change min_ready / max_workers / enabled; the scheduler acts on its next run."""
    services = svc()
    with services.transaction() as session:
        pool = patch_pool(session, path.name, body, services.clock.now())
        counts = counts_by_pool(session)
        return _admin_pool(pool, counts.get(pool.name)).model_dump(mode="json")


def _admin_pool(pool: Pool, counts: PoolCounts | None) -> AdminPoolOut:
    counts = counts or PoolCounts({}, 0)
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
        counts=counted,
    )


# ---- workers ----------------------------------------------------------------------


@bp.get("/workers", responses={200: AdminWorkerList})
def list_workers(query: AdminWorkerQuery) -> Any:
    session = svc().session()
    statement = select(Worker)
    if query.pool:
        statement = statement.where(Worker.pool == query.pool)
    statement = by_state(statement, Worker.state, query.state, LIVE_WORKER_STATES)
    rows = session.exec(
        statement.order_by(col(Worker.created_at).desc(), col(Worker.id))
        .offset(query.offset)
        .limit(query.limit)
    ).all()
    lease_of = _leases_of(session, [w.id for w in rows])
    workers = [
        AdminWorkerOut(
            **w.model_dump(include=set(AdminWorkerOut.model_fields) - {"lease_id"}),
            lease_id=lease_of.get(w.id),
        )
        for w in rows
    ]
    return AdminWorkerList(workers=workers, next_offset=_next_offset(query, len(rows))).model_dump(
        mode="json"
    )


def _leases_of(session: Any, worker_ids: list[str]) -> dict[str, str]:
    if not worker_ids:
        return {}
    statement = select(Lease.worker_id, Lease.id).where(col(Lease.worker_id).in_(worker_ids))
    return {worker_id: lease_id for worker_id, lease_id in session.exec(statement).all()}


@bp.delete("/workers/<worker_id>", responses={200: AdminWorkerOut, **problems(404)})
def destroy_worker(path: WorkerPath) -> Any:
    """Destroy the worker now (its lease, if any, is revoked)."""
    services = svc()
    with services.transaction() as session:
        worker = session.get(Worker, path.worker_id)
        if worker is None:
            raise NotFound(f"no worker {path.worker_id!r}")
        now = services.clock.now()
        lease = session.exec(select(Lease).where(Lease.worker_id == worker.id)).first()
        if lease is not None and lease.state in LIVE_LEASE_STATES:
            leasing.revoke_lease(session, lease.id, now, "worker destroyed by operator")
        elif worker.state in ("provisioning", "ready"):
            fail_worker(session, worker, "destroyed by operator", now)
        lease_id = lease.id if lease else None
        return AdminWorkerOut(
            **worker.model_dump(include=set(AdminWorkerOut.model_fields) - {"lease_id"}),
            lease_id=lease_id,
        ).model_dump(mode="json")


# ---- leases -----------------------------------------------------------------------


@bp.get("/leases", responses={200: LeaseList})
def list_leases(query: AdminLeaseQuery) -> Any:
    session = svc().session()
    statement = select(Lease)
    if query.tenant:
        statement = statement.where(Lease.tenant_id == query.tenant)
    if query.pool:
        statement = statement.where(Lease.pool == query.pool)
    statement = by_state(statement, Lease.state, query.state, LIVE_LEASE_STATES)
    rows = session.exec(
        statement.order_by(col(Lease.created_at).desc(), col(Lease.id))
        .offset(query.offset)
        .limit(query.limit)
    ).all()
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
    session = svc().session()
    statement = select(Event).order_by(col(Event.id).desc()).limit(query.limit)
    if query.before is not None:
        statement = statement.where(col(Event.id) < query.before)
    rows = session.exec(statement).all()
    events = [EventOut.model_validate(e, from_attributes=True) for e in rows]
    next_before = rows[-1].id if len(rows) == query.limit else None
    return EventList(events=events, next_before=next_before).model_dump(mode="json")
