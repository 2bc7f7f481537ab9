"""Domain tests: functions called with a session and a fixed clock, no HTTP, no scheduler."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from service import tenants
from service.db import session_factory, session_scope
from service.models import Worker
from service.pools import new_worker
from service.workers import mark_ready

Tx = Callable[[], AbstractContextManager[Session]]


@pytest.fixture
def tx(engine: Engine) -> Tx:
    """``with tx() as session:`` runs one transaction, as a domain function's caller does."""
    factory = session_factory(engine)
    return lambda: session_scope(factory)


def add_ready_worker(session: Session, pool: str, now: datetime) -> Worker:
    """A worker whose agent has reported ready."""
    worker = new_worker(pool, now)
    session.add(worker)
    session.flush()
    mark_ready(session, worker, "http://127.0.0.1:1/", "127.0.0.1", now)
    return worker


def add_tenant(tx: Tx, now: datetime) -> str:
    with tx() as session:
        return tenants.create(session, "acme", now)[0].id
