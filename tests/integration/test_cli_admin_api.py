"""The operator's CLI acting through a running service's admin API (``--url``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.server import ServerProcess, pool

pytestmark = pytest.mark.integration


def _cli(
    server: ServerProcess, *args: str, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERLEASE_")}
    if token:
        env["WORKERLEASE_ADMIN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args, "--url", server.url],
        capture_output=True,
        text=True,
        # A bound on a hang, not a speed check: beside two test suites at load 20 one
        # call printed its answer and was still exiting at 60 s.
        timeout=300,
        env=env,
        cwd=server.dir,
    )


def test_changes_through_the_admin_api_of_a_running_service(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, pools=[pool(min_ready=1, max_workers=2, capabilities=[])])
    try:
        server.start()
        token = server.admin_token
        assert token
        created = _cli(server, "tenants", "create", "acme", token=token)
        assert created.returncode == 0, created.stderr
        tenant_id = created.stdout.split("tenant id:")[1].split()[0]
        tenant_token = created.stdout.split("token:")[1].split()[0]
        assert server.request("GET", "/v1/pools", token=tenant_token).status_code == 200

        server.wait_ready_workers(1)
        lease = server.request(
            "POST", "/v1/leases", token=tenant_token, json={"pool": "hosted-ubuntu"}
        )
        assert lease.status_code == 201, lease.text
        revoked = _cli(server, "leases", "revoke", lease.json()["id"], token=token)
        assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr

        missing = _cli(server, "workers", "destroy", "w-00000000000000000000", token=token)
        assert missing.returncode == 1 and "Not found" in missing.stderr
        no_token = _cli(server, "tenants", "disable", tenant_id)
        assert no_token.returncode == 1 and "WORKERLEASE_ADMIN_TOKEN" in no_token.stderr
        disabled = _cli(server, "tenants", "disable", tenant_id, token=token)
        assert disabled.returncode == 0, disabled.stderr
        assert server.request("GET", "/v1/pools", token=tenant_token).status_code == 401
    finally:
        server.close()
