"""The operators' CLI on a served database: tenants disable, workers list, leases
list/revoke, each listing as a table or ``--json``; what it changes lands in the
audit log like the admin API's changes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlmodel import select

from service import leasing
from service.clock import utcnow
from service.db import make_engine, session_factory, session_scope
from service.models import Event
from tests.unit.test_cli_reads import _clean_env, _run, _served_database  # noqa: F401


def _json(url: str, *args: str) -> Any:
    result = _run(*args, "--json", env={"WORKERLEASE_DATABASE_URL": url})
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _cli(url: str, *args: str) -> Any:
    return _run(*args, env={"WORKERLEASE_DATABASE_URL": url})


def _pending_lease(url: str, tenant_id: str) -> str:
    engine = make_engine(url)
    try:
        with session_scope(session_factory(engine)) as session:
            return leasing.acquire(session, tenant_id, "hosted-ubuntu", utcnow()).lease.id
    finally:
        engine.dispose()


def _reasons(url: str, subject: str) -> list[str]:
    engine = make_engine(url)
    try:
        with session_scope(session_factory(engine)) as session:
            events = session.exec(select(Event).where(Event.subject_id == subject)).all()
            return [e.reason for e in events]
    finally:
        engine.dispose()


def test_leases_list_and_revoke(tmp_path: Path) -> None:
    url = _served_database(tmp_path)
    created = _cli(url, "tenants", "create", "acme")
    assert created.exit_code == 0, created.output
    tenant_id = created.output.split("tenant id:")[1].split()[0]
    lease_id = _pending_lease(url, tenant_id)

    (listed,) = _json(url, "leases", "list")
    assert (listed["id"], listed["state"]) == (lease_id, "pending")
    assert listed["waiting_reason"]["kind"] == "worker_on_its_way"
    table = _cli(url, "leases", "list").output.splitlines()
    assert table[0].split()[:3] == ["ID", "POOL", "STATE"]
    assert lease_id in table[1] and "a worker is on its way" in table[1]

    revoked = _cli(url, "leases", "revoke", lease_id)
    assert revoked.exit_code == 0 and "revoked" in revoked.output, revoked.output
    assert _json(url, "leases", "list") == []
    assert [x["state"] for x in _json(url, "leases", "list", "--state", "all")] == ["revoked"]
    assert "revoked by operator (cli)" in " ".join(_reasons(url, lease_id))

    missing = _cli(url, "leases", "revoke", "l-00000000000000000000")
    assert missing.exit_code == 1 and "no lease" in missing.output.lower(), missing.output


def test_tenants_disable_and_list(tmp_path: Path) -> None:
    url = _served_database(tmp_path)
    created = _cli(url, "tenants", "create", "acme")
    tenant_id = created.output.split("tenant id:")[1].split()[0]
    assert [(t["id"], t["enabled"]) for t in _json(url, "tenants", "list")] == [(tenant_id, True)]

    disabled = _cli(url, "tenants", "disable", tenant_id)
    assert disabled.exit_code == 0, disabled.output
    assert [t["enabled"] for t in _json(url, "tenants", "list")] == [False]
    assert _reasons(url, tenant_id)  # audit-logged

    missing = _cli(url, "tenants", "disable", "t-nobody")
    assert missing.exit_code == 1 and "no tenant" in missing.output, missing.output


def test_workers_list(tmp_path: Path) -> None:
    url = _served_database(tmp_path)
    assert _json(url, "workers", "list") == []
    header = _cli(url, "workers", "list").output.splitlines()
    assert header == ["ID  POOL  STATE  CREATED_AT  LEASE"]


def test_workers_destroy_and_version(tmp_path: Path) -> None:
    from service import __version__
    from service.models import WorkerState
    from service.pools import new_worker

    url = _served_database(tmp_path)
    engine = make_engine(url)
    try:
        with session_scope(session_factory(engine)) as session:
            worker = new_worker("hosted-ubuntu", utcnow())
            session.add(worker)
            worker_id = worker.id
    finally:
        engine.dispose()
    destroyed = _cli(url, "workers", "destroy", worker_id)
    assert destroyed.exit_code == 0, destroyed.output
    assert f"worker {worker_id}: {WorkerState.DESTROYING}" in destroyed.output
    assert any("operator" in reason for reason in _reasons(url, worker_id))
    unknown = _cli(url, "workers", "destroy", "w-00000000000000000000")
    assert unknown.exit_code != 0 and "no worker" in unknown.output
    version = _run("--version", env={})
    assert version.exit_code == 0 and __version__ in version.output


def test_pools_as_a_fitted_table_and_as_json(tmp_path: Path) -> None:
    url = _served_database(tmp_path)
    listed = {entry["name"]: entry for entry in _json(url, "pools")}
    assert set(listed) == {"hosted-ubuntu", "hosted-windows"}
    assert {"min_ready", "ready", "pending", "degraded_reason"} <= set(listed["hosted-ubuntu"])
    table = _cli(url, "pools").output.splitlines()
    assert table[0].split()[:3] == ["NAME", "OS", "PROVISIONER"]
    assert len(table) == 3
