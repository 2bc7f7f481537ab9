"""Small helpers shared by the API tests: lease calls and reads of the database rows."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient
from sqlmodel import col, select
from werkzeug.test import TestResponse

from service.db import session_factory, session_scope
from service.models import Event, Lease, Pool
from tests.conftest import Service, admin, bearer

POOL = "hosted-ubuntu"


def request_lease(client: FlaskClient, token: str, pool: str = POOL, **body: Any) -> TestResponse:
    return client.post("/v1/leases", json={"pool": pool, **body}, headers=bearer(token))


def lease_row(svc: Service, lease_id: str) -> Lease:
    with session_scope(session_factory(svc.engine)) as session:
        lease = session.get(Lease, lease_id)
        assert lease is not None
        return lease


def lease_rows(svc: Service) -> list[Lease]:
    with session_scope(session_factory(svc.engine)) as session:
        return list(session.exec(select(Lease).order_by(col(Lease.created_at))).all())


def pool_row(svc: Service, name: str = POOL) -> Pool:
    with session_scope(session_factory(svc.engine)) as session:
        pool = session.get(Pool, name)
        assert pool is not None
        return pool


def events_of(svc: Service, subject_id: str) -> list[Event]:
    with session_scope(session_factory(svc.engine)) as session:
        statement = select(Event).where(Event.subject_id == subject_id).order_by(col(Event.id))
        return list(session.exec(statement).all())


def worker_state(svc: Service, worker_id: str) -> str:
    [worker] = [w for w in svc.workers() if w.id == worker_id]
    return worker.state


def admin_pool(svc: Service, name: str = POOL) -> dict[str, Any]:
    pools = svc.client.get("/v1/admin/pools", headers=admin()).get_json()["pools"]
    [pool] = [p for p in pools if p["name"] == name]
    return pool


def patch_pool(svc: Service, name: str = POOL, **changes: Any) -> TestResponse:
    return svc.client.patch(f"/v1/admin/pools/{name}", json=changes, headers=admin())
