"""Tenants: created with a token shown once, disabled (never deleted, for the audit trail)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, insert
from sqlmodel import Session, col, select

from service.db import core_connection
from service.driver_sql import DriverStatement
from service.errors import NotFound
from service.leasing import end_tenant_leases
from service.models import Tenant
from service.security import TENANT_TOKEN_PREFIX, hash_token, new_id, new_token
from service.states import record


def create(session: Session, name: str, now: datetime) -> tuple[Tenant, str]:
    token = new_token(TENANT_TOKEN_PREFIX)
    tenant = Tenant(**_new_row(name, token, now))
    session.add(tenant)
    record(session, "tenant", tenant.id, f"created: {name}", now, tenant_id=tenant.id)
    return tenant, token


def create_many(session: Session, names: Sequence[str], now: datetime) -> list[tuple[str, str]]:
    """A tenant for each name, as ``create``; their ids and tokens, in order.

    One ``executemany`` on the driver's cursor, no ORM object each: ``workerlease
    simulate`` creates a tenant per request of its trace, and building them was 4 % of
    a replay's profile."""
    tokens = [new_token(TENANT_TOKEN_PREFIX) for _ in names]
    rows = [_new_row(name, token, now) for name, token in zip(names, tokens, strict=True)]
    for row in rows:
        record(session, "tenant", row["id"], f"created: {row['name']}", now, tenant_id=row["id"])
    if rows:
        _INSERT_TENANTS.run_many(core_connection(session), rows)
    return [(row["id"], token) for row, token in zip(rows, tokens, strict=True)]


_TENANTS: Table = Tenant.__table__  # type: ignore[attr-defined]
_INSERT_TENANTS = DriverStatement(
    insert(_TENANTS).values({column.key: bindparam(column.key) for column in _TENANTS.c})
)


def _new_row(name: str, token: str, now: datetime) -> dict[str, Any]:
    """Every column of a new tenant's row; only the token's hash is kept."""
    return {
        "id": new_id("t"),
        "name": name,
        "token_hash": hash_token(token),
        "enabled": True,
        "created_at": now,
        "disabled_at": None,
    }


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
