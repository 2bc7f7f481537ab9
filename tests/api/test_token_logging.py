"""No token of any kind reaches the logs, even at DEBUG and through the database's own logging."""

from __future__ import annotations

import logging

import pytest

from provisioners import TransientProvisionerError
from tests.api.helpers import request_lease
from tests.conftest import ADMIN_TOKEN, Service, admin, bearer


def test_a_whole_lease_flow_logs_no_token(svc: Service, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tenant = svc.tenant()
    token = tenant["token"]
    svc.tick()
    bootstrap = {r.spec.bootstrap_token for r in svc.cloud.resources.values()}
    svc.client.post(
        f"/v1/workers/{svc.workers('provisioning')[0].id}/ready",
        json={"agent_url": "http://127.0.0.1:1/"},
        headers=bearer("wlb_wrong"),
    )
    svc.agents_report_ready()
    lease = request_lease(svc.client, token).get_json()
    access = lease["worker"]["access_token"]
    svc.client.post(f"/v1/leases/{lease['id']}/renew", headers=bearer(token))
    svc.client.get("/v1/leases", headers=bearer(token + "x"))  # a failed login
    svc.client.get("/v1/admin/workers", headers=admin())
    request_lease(svc.client, token)  # the idempotent path
    svc.cloud.inject("destroy", TransientProvisionerError("throttled"))
    svc.client.delete(f"/v1/leases/{lease['id']}", headers=bearer(token))
    svc.tick()
    svc.clock.advance(minutes=5)
    svc.tick()
    svc.client.delete(f"/v1/admin/tenants/{tenant['id']}", headers=admin())
    svc.reconcile()

    secrets = {token, access, ADMIN_TOKEN, *bootstrap}
    assert len(bootstrap) == 2 and all(secrets)
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    logged = [formatter.format(record) for record in caplog.records]
    assert logged, "the flow should log something"
    leaks = [line for line in logged for secret in secrets if secret in line]
    assert leaks == []
    assert not [line for line in logged if "wlt_" in line or "wla_" in line or "wlb_" in line]
