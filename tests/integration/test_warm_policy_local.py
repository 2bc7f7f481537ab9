"""The adaptive warm policy in a real ``serve`` with a local pool: as the simulator says,
the ready count rises with demand ahead of a burst's continuation, and falls back once
the demand is gone, not before ``scale_down_delay``.

Time is compressed through the pool's own settings: a demand half-life of 8 s (the
estimate forgets a burst within ~30 s) and a scale-down delay of 10 s. Every check waits
for an outcome with a deadline; the timing of the fall is read from the audit log.
"""

from __future__ import annotations

import shutil
import stat
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from provisioners.local_uids import unreachable_part
from tests.support.server import ServerProcess, pool, wait_until, worker_root

pytestmark = pytest.mark.integration

POOL = "adaptive-ubuntu"
SCALE_DOWN_DELAY_S = 10
BOOT_S = 1  # each worker's agent starts this much later, so provisioning takes a while


def _slow_python(directory: Path) -> str:
    """A python that starts the agent ``BOOT_S`` late, runnable by workers' own uids."""
    candidates = [sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")]
    python = next(c for c in candidates if c and unreachable_part(Path(c), stat.S_IXOTH) is None)
    wrapper = directory / "slow-python"
    wrapper.write_text(f'#!/bin/sh\nsleep {BOOT_S}\nexec {python} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def _warm(server: ServerProcess) -> dict[str, Any]:
    pools = server.admin("GET", "/v1/admin/pools").json()["pools"]
    [entry] = [p for p in pools if p["name"] == POOL]
    return {"ready": entry["counts"]["ready"], **entry["warm"]}


def _request(server: ServerProcess, token: str) -> dict[str, Any]:
    response = server.request("POST", "/v1/leases", token=token, json={"pool": POOL})
    assert response.status_code in (201, 202), response.text  # active, or pending
    return {"token": token, **response.json()}


def _active(server: ServerProcess, lease: dict[str, Any]) -> bool:
    got = server.request("GET", f"/v1/leases/{lease['id']}", token=lease["token"]).json()
    return bool(got["state"] == "active")


def _at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def test_adaptive_pool_warms_ahead_of_a_burst_and_cools_after_the_delay(tmp_path: Path) -> None:
    wrapper_dir = worker_root("workerlease-it-python-")
    adaptive = pool(
        POOL,
        min_ready=0,
        max_workers=10,
        capabilities=[],
        warm_policy="adaptive",
        warm_hit_target=0.95,
        scale_down_delay=f"{SCALE_DOWN_DELAY_S}s",
        demand_half_life="8s",
        options={"python": _slow_python(wrapper_dir)},
    )
    server = ServerProcess(tmp_path, pools=[adaptive])
    try:
        server.start()
        tokens = [server.create_tenant(f"tenant-{i}")["token"] for i in range(6)]
        # No request yet: nothing asks for a worker (min_ready 0), and none is made.
        assert _warm(server)["target"] == 0 and server.pool_counts(POOL)["provisioning"] == 0

        # The burst begins: four requests find no worker and wait for new ones.
        first = [_request(server, token) for token in tokens[:4]]
        wait_until(
            lambda: all(_active(server, lease) for lease in first),
            60,
            message=lambda: f"the first leases never became active: {_warm(server)}",
        )
        # With the leases held, the pool keeps ready workers beyond min_ready 0, because
        # the demand estimate asks for them (not because a lease waits).
        risen = wait_until(
            lambda: (w := _warm(server))["ready"] >= 2 and w,
            30,
            message=lambda: f"no ready workers ahead of more requests: {_warm(server)}",
        )
        assert risen["policy"] == "adaptive" and risen["demand_target"] >= 2, risen
        assert server.pool_counts(POOL)["leased"] == 4

        # The burst continues: these requests are served at once by the warm workers.
        later = [_request(server, token) for token in tokens[4:]]
        assert [lease["state"] for lease in later] == ["active", "active"], later

        # The lull: every lease ends, no request comes. Once the estimate has forgotten
        # the burst, the ready workers are trimmed back to the floor.
        for lease in first + later:
            released = server.request("DELETE", f"/v1/leases/{lease['id']}", token=lease["token"])
            assert released.status_code == 200, released.text
        wait_until(
            lambda: (w := _warm(server))["ready"] == 0 and w["target"] == 0,
            60,
            message=lambda: f"the ready workers were never trimmed: {_warm(server)}",
        )
        events = server.admin("GET", "/v1/admin/events", params={"limit": 1000}).json()["events"]
        trims = [_at(e["at"]) for e in events if e["reason"] == "surplus ready worker"]
        last_request = max(_at(lease["created_at"]) for lease in first + later)
        assert trims, "no ready worker was trimmed"
        # Trim held the workers for scale_down_delay after the last request's peak.
        assert min(trims) >= last_request + timedelta(seconds=SCALE_DOWN_DELAY_S), (
            min(trims),
            last_request,
        )
    finally:
        server.close()
        shutil.rmtree(wrapper_dir, ignore_errors=True)
