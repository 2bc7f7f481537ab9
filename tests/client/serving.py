"""Helpers of the client's tests against a real ``workerlease serve`` with local pools.

One server per test module (starting one costs seconds on a loaded machine); each test
has a tenant of its own, so its leases are its own. Outcomes are checked through the
tenant API, and waits are polls with deadlines."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.server import ServerProcess

POOL = "hosted-ubuntu"
SHORT = "short-idle"
SHORT_IDLE_S = 5
WL = str(Path(sys.executable).parent / "wl")


@dataclass
class Served:
    server: ServerProcess

    @property
    def url(self) -> str:
        return self.server.url

    def tenant(self) -> str:
        token: str = self.server.create_tenant(f"client-{uuid.uuid4().hex[:8]}")["token"]
        return token

    def lease(self, token: str, lease_id: str) -> dict[str, Any]:
        response = self.server.request("GET", f"/v1/leases/{lease_id}", token=token)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def leases(self, token: str, state: str = "all") -> list[dict[str, Any]]:
        response = self.server.request("GET", f"/v1/leases?state={state}", token=token)
        assert response.status_code == 200, response.text
        leases: list[dict[str, Any]] = response.json()["leases"]
        return leases

    def tasks_of(self, token: str, lease_id: str) -> list[dict[str, Any]]:
        response = self.server.request("GET", f"/v1/leases/{lease_id}/tasks", token=token)
        assert response.status_code == 200, response.text
        tasks: list[dict[str, Any]] = response.json()["tasks"]
        return tasks


def wl(
    served: Served, token: str, *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WORKERLEASE_URL": served.url, "WORKERLEASE_TOKEN": token}
    return subprocess.run(
        [WL, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
