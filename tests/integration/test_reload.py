"""SIGHUP to ``serve`` applies the config file's pools again, without dropping requests;
a file that does not validate is refused with the key named, and the old settings stay."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.server import ServerProcess, pool, wait_until

pytestmark = pytest.mark.integration


def _pools(server: ServerProcess) -> dict[str, dict[str, Any]]:
    answer = server.admin("GET", "/v1/admin/pools")
    assert answer.status_code == 200, answer.text
    return {entry["name"]: entry for entry in answer.json()["pools"]}


def test_sighup_reloads_pools_and_refuses_a_bad_file(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, pools=[pool(min_ready=1, max_workers=3, capabilities=[])])
    try:
        server.start()
        assert server.process is not None
        errors: list[str] = []
        stop = threading.Event()

        def keep_asking() -> None:  # a client that must never see a refused request
            with requests.Session() as http:
                while not stop.is_set():
                    try:
                        status = http.get(f"{server.url}/healthz", timeout=30).status_code
                        if status != 200:
                            errors.append(f"status {status}")
                    except requests.RequestException as exc:
                        errors.append(type(exc).__name__)
                    # ~100 requests a second: enough to land during the reload, not a
                    # core's worth of load (the test took 68 s instead of 9 s beside
                    # another test process).
                    stop.wait(0.01)

        asker = threading.Thread(target=keep_asking, daemon=True)
        asker.start()

        server.config["pools"][0]["max_workers"] = 5
        server.config["pools"].append(server._with_work_root(pool("second", min_ready=0)))
        server.write_config()
        os.kill(server.process.pid, signal.SIGHUP)
        wait_until(
            lambda: (
                "second" in _pools(server) and _pools(server)["hosted-ubuntu"]["max_workers"] == 5
            ),
            90,
            message="SIGHUP did not apply the new pools",
        )

        server.config["pools"][0]["min_ready"] = "many"
        server.write_config()
        os.kill(server.process.pid, signal.SIGHUP)
        wait_until(
            lambda: "reload_refused" in server.log_text(), 90, message="no reload_refused line"
        )
        refused = next(line for line in server.log_text().splitlines() if "reload_refused" in line)
        assert "pools.0.min_ready" in refused
        assert _pools(server)["hosted-ubuntu"]["max_workers"] == 5  # what was in force stays
        stop.set()
        asker.join(60)
        assert errors == []
        assert server.process.poll() is None
    finally:
        server.close()
