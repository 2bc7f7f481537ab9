"""``tenants.create_many``: the replay's bulk create makes the tenants ``create`` makes."""

from __future__ import annotations

from sqlmodel import select

from service import tenants
from service.models import Event, Tenant
from service.security import hash_token
from tests.support.fakes import ManualClock
from tests.unit.conftest import Tx


def test_create_many_makes_tenants_their_tokens_authenticate_as_create_does(
    tx: Tx, clock: ManualClock
) -> None:
    with tx() as session:
        created = tenants.create_many(session, ["acme", "globex"], clock.now())
        single, single_token = tenants.create(session, "initech", clock.now())
    with tx() as session:
        rows = {t.id: t for t in session.exec(select(Tenant)).all()}
        audited = {e.subject_id: e.reason for e in session.exec(select(Event)).all()}
    assert [rows[tenant_id].name for tenant_id, _ in created] == ["acme", "globex"]
    for tenant_id, token in [*created, (single.id, single_token)]:
        row = rows[tenant_id]
        assert row.token_hash == hash_token(token)
        assert row.enabled and row.disabled_at is None
        assert row.created_at == clock.now()
        assert audited[tenant_id] == f"created: {row.name}"
