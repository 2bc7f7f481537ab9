"""Tenants: created with a token shown once, disabled (never deleted, for the audit trail)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlmodel import Session, col, select

from service.errors import NotFound
from service.leasing import end_tenant_leases
from service.models import Tenant
from service.security import TENANT_TOKEN_PREFIX, hash_token, new_id, new_token
from service.states import record


def create(session: Session, name: str, now: datetime) -> tuple[Tenant, str]:
    token = new_token(TENANT_TOKEN_PREFIX)
    tenant = Tenant(id=new_id("t"), name=name, token_hash=hash_token(token), created_at=now)
    session.add(tenant)
    record(session, "tenant", tenant.id, f"created: {name}", now, tenant_id=tenant.id)
    return tenant, token


def disable(session: Session, tenant_id: str, now: datetime) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id!r}")
    if tenant.enabled:
        tenant.enabled = False
        tenant.disabled_at = now
        session.add(tenant)
        ended = end_tenant_leases(session, tenant.id, now)
        record(
            session,
            "tenant",
            tenant.id,
            f"disabled; {ended} live leases ended",
            now,
            tenant_id=tenant.id,
        )
    return tenant


def page(session: Session, limit: int, offset: int) -> Sequence[Tenant]:
    statement = select(Tenant).order_by(col(Tenant.created_at), col(Tenant.id))
    return session.exec(statement.offset(offset).limit(limit)).all()
