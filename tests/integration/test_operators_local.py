"""What an operator of the quick start sees and does, against a real ``serve`` with
real local agents: a worker that cannot call back is named with the reason, ``make
tenant`` fails loudly, ``make stop`` (``workerlease cleanup``) removes what ``serve``
left running, and the README's command-line section runs as written."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.server import ServerProcess, free_port, pool, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
POOL = "hosted-ubuntu"


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    servers: list[ServerProcess] = []

    def make(**kwargs: Any) -> ServerProcess:
        server = ServerProcess(tmp_path, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def admin_pool(server: ServerProcess, name: str = POOL) -> dict[str, Any]:
    pools = server.admin("GET", "/v1/admin/pools").json()["pools"]
    found: dict[str, Any] = next(p for p in pools if p["name"] == name)
    return found


def test_a_worker_that_cannot_reach_the_service_is_named_in_the_pool_and_the_log(
    make_server: Callable[..., ServerProcess],
) -> None:
    """``public_url`` (or --port) pointing where nothing listens: the agents never call
    back; the pool says which worker did not, within what, and what to check."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    server = make_server(
        pools=[pool(min_ready=1, max_workers=2, provision_timeout="3s")],
        extra={"public_url": nowhere},
    ).start()

    def reason() -> str | None:
        value: str | None = admin_pool(server)["degraded_reason"]
        return value if value and "did not call back" in value else None

    found = wait_until(reason, 60, message=lambda: f"{admin_pool(server)}\n{server.log_tail()}")
    assert re.search(r"worker w-[0-9a-f]+ did not call back within 3s", found)
    assert "public_url" in found and "--port" in found
    wait_until(
        lambda: (
            f"provision_timeout pool={POOL}" in server.log_text()
            and f"service_url={nowhere}" in server.log_text()
        ),
        30,
        message=server.log_tail,
    )
    metrics = server.request("GET", "/metrics").text
    assert f'workerlease_pool_degraded{{pool="{POOL}"}} 1.0' in metrics


def _live_rows(db_path: Path) -> dict[str, str]:
    with sqlite3.connect(db_path, timeout=10) as connection:
        rows = connection.execute(
            "SELECT id, state FROM workers WHERE state <> 'destroyed'"
        ).fetchall()
    connection.close()
    return dict(rows)


def _lease_state(db_path: Path, lease_id: str) -> tuple[str, str]:
    with sqlite3.connect(db_path, timeout=10) as connection:
        row = connection.execute(
            "SELECT state, end_reason FROM leases WHERE id = ?", (lease_id,)
        ).fetchone()
    connection.close()
    return row[0], row[1]


def _cleanup(server: ServerProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "cleanup", "--config", str(server.config_path)],
        env=server.env(),
        cwd=server.dir,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_make_stop_destroys_the_workers_serve_left_running(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server(pools=[pool(min_ready=2, max_workers=4)]).start()
    server.wait_ready_workers(2)
    token = server.create_tenant("acme")["token"]
    leased = server.request("POST", "/v1/leases", token=token, json={"pool": POOL})
    assert leased.status_code == 201, leased.text
    lease_id = leased.json()["id"]

    refused = _cleanup(server)  # the service still runs: its workers are not ours to take
    assert refused.returncode != 0
    assert "stop the service first" in refused.stderr
    assert _lease_state(server.db_path, lease_id) == ("active", None)

    assert server.stop() == 0
    agents = server.agents()
    assert len(agents) >= 3, "serve leaves its agents running (a restart finds them)"

    done = subprocess.run(
        ["make", "-s", "stop", f"CONFIG={server.config_path}", f"VENV={ROOT / '.venv'}"],
        cwd=ROOT,
        env=server.env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "leases ended: 1" in done.stdout
    wait_until(lambda: not server.agents(), 30, message=lambda: f"agents left: {server.agents()}")
    assert _live_rows(server.db_path) == {}
    assert _lease_state(server.db_path, lease_id) == ("revoked", "revoked")

    again = _cleanup(server)  # nothing left: a second run is a no-op, not an error
    assert again.returncode == 0, again.stderr
    assert "workers destroyed: 0" in again.stdout


def test_make_tenant_fails_loudly_when_the_service_is_down(tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("x" * 32 + "\n")
    port = free_port()
    result = subprocess.run(
        ["make", "-s", "tenant", f"PORT={port}", f"ADMIN_TOKEN_FILE={token_file}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"could not create the tenant at http://127.0.0.1:{port}" in result.stderr

    missing = subprocess.run(
        ["make", "-s", "tenant", f"ADMIN_TOKEN_FILE={tmp_path / 'absent'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode != 0 and "make run" in missing.stderr


def _readme_commands() -> list[list[str]]:
    """The commands of the README's command-line section, as written there."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Command line", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    commands = []
    for line in block.splitlines():
        words = line.split("#", 1)[0].split()
        if words and words[0].endswith("workerlease"):
            commands.append(words)
    return commands


def test_the_readme_command_line_section_runs_as_written() -> None:
    commands = _readme_commands()
    assert len(commands) >= 8
    for words in commands:
        assert words[0] == ".venv/bin/workerlease", words
        # The command's own words (up to its first option or argument), with --help.
        path = [w for w in words[1:] if re.fullmatch(r"[a-z][a-z-]*", w)]
        result = subprocess.run(
            [str(ROOT / words[0]), *path[:2], "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (words, result.stderr)


LOG_LINE = re.compile(
    r"^ts=\S+Z level=(debug|info|warning|error|critical) logger=\S+ proc=\d+ event=[a-z_.]+"
)


def test_serve_gunicorn_and_the_scheduler_log_one_format(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server(pools=[pool(min_ready=1, max_workers=2)]).start()
    server.wait_ready_workers(1)
    healthz = server.request("GET", "/healthz", headers={"X-Request-Id": "ops-check-1"})
    assert healthz.status_code == 200 and healthz.headers["X-Request-Id"] == "ops-check-1"

    def lines() -> list[str]:
        return [
            line
            for line in server.log_text().splitlines()
            if line.strip() and not line.startswith("===== start")
        ]

    wait_until(
        lambda: (
            any(
                "event=http_request method=GET path=/healthz status=200" in x
                and x.endswith(" request_id=ops-check-1")
                for x in lines()
            )
            and any("event=scheduler_started interval=" in x for x in lines())
            and any("logger=gunicorn.error" in x for x in lines())
        ),
        30,
        message=server.log_tail,
    )
    odd = [line for line in lines() if not LOG_LINE.match(line)]
    assert odd == []
