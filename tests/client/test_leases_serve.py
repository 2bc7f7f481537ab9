"""Leases through ``wl`` and the SDK against a real serve: tables, ``--json``, one-line
errors, ``with`` blocks that release on exceptions, renew in the background."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from workerlease_client import Client, Conflict, NotFound

from tests.client.serving import POOL, SHORT, SHORT_IDLE_S, WL, Served, one_line_error, wl
from tests.support.server import wait_until

pytestmark = pytest.mark.integration


def test_wl_pools_and_the_lease_commands_in_tables_and_json(served: Served) -> None:
    token = served.tenant()
    table = wl(served, token, "pools")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:2] == ["NAME", "OS"]
    assert {row.split()[0] for row in rows} == {POOL, SHORT}
    column = header.index("OS")  # aligned: every row's OS starts under the header's
    assert all(row[column:].startswith("ubuntu ") for row in rows), table.stdout
    assert "  1h  " in rows[0] and "  3d  " in rows[0]
    pools = json.loads(wl(served, token, "pools", "--json").stdout)
    assert {p["name"] for p in pools["pools"]} == {POOL, SHORT}

    acquired = wl(served, token, "lease", "acquire", POOL, "--wait", "120", "--json")
    assert acquired.returncode == 0, acquired.stderr
    lease = json.loads(acquired.stdout)
    assert lease["state"] == "active" and lease["pool"] == POOL
    assert acquired.stderr == ""  # not a terminal: no progress line

    listed = json.loads(wl(served, token, "lease", "list", "--json").stdout)
    assert [item["id"] for item in listed["leases"]] == [lease["id"]]
    shown = wl(served, token, "lease", "show", lease["id"])
    assert shown.returncode == 0 and f"id            {lease['id']}" in shown.stdout
    table_list = wl(served, token, "--json", "lease", "list")  # --json before the command too
    assert json.loads(table_list.stdout)["leases"][0]["id"] == lease["id"]

    renewed = json.loads(wl(served, token, "lease", "renew", lease["id"], "--json").stdout)
    assert renewed["idle_expires_at"] >= lease["idle_expires_at"]
    released = wl(served, token, "lease", "release", lease["id"], "--json")
    assert json.loads(released.stdout)["state"] == "released"
    assert served.lease(token, lease["id"])["state"] == "released"

    missing = wl(served, token, "lease", "show", "l-00000000000000000000")
    assert missing.returncode == 1 and missing.stdout == ""
    assert one_line_error(missing).startswith("error: Not found: ")
    ended = wl(served, token, "lease", "renew", lease["id"])
    assert ended.returncode == 1 and one_line_error(ended).startswith("error: Conflict: ")
    bad_token = wl(served, "wlt_not-a-token", "pools")
    assert bad_token.returncode == 1 and one_line_error(bad_token).startswith("error: Unauthorized")


def test_wl_usage_errors_and_configuration_errors_are_one_line(served: Served) -> None:
    token = served.tenant()
    usage = wl(served, token, "lease", "show")
    assert usage.returncode == 2 and one_line_error(usage).startswith("error: usage: ")
    no_script = wl(served, token, "run", POOL)
    assert no_script.returncode == 2 and "no script" in one_line_error(no_script)
    assert served.leases(token) == []  # refused before anything was leased
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERLEASE_")}
    unconfigured = subprocess.run(
        [WL, "pools"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert unconfigured.returncode == 1
    assert "WORKERLEASE_URL" in one_line_error(unconfigured)


def test_sdk_with_block_releases_on_an_exception(served: Served) -> None:
    token = served.tenant()
    held: list[str] = []
    client = Client(served.url, token)
    with (
        pytest.raises(RuntimeError, match="the step failed"),
        client,
        client.lease(POOL, 120) as lease,
    ):
        held.append(lease.id)
        assert lease.info.state == "active" and lease.worker is not None
        assert served.lease(token, lease.id)["state"] == "active"
        raise RuntimeError("the step failed")
    assert served.lease(token, held[0])["state"] == "released"
    assert served.lease(token, held[0])["end_reason"] == "released"


def test_sdk_background_renew_keeps_a_lease_past_its_idle_timeout(served: Served) -> None:
    token = served.tenant()
    with Client(served.url, token) as client:
        # The control: not renewed, a lease of this pool ends within its idle timeout.
        idle = client.acquire(SHORT, wait=120)
        wait_until(
            lambda: served.lease(token, idle.id)["state"] == "expired",
            SHORT_IDLE_S + 60,
            message="an idle lease of the short pool never expired",
        )
        with client.lease(SHORT, wait=120) as lease:
            held_until = time.monotonic() + 3 * SHORT_IDLE_S
            while time.monotonic() < held_until:
                assert served.lease(token, lease.id)["state"] == "active", lease.ended
                time.sleep(0.5)
            assert lease.ended is None
        assert served.lease(token, lease.id)["end_reason"] == "released"


def test_sdk_errors_carry_the_problem_document(served: Served) -> None:
    token = served.tenant()
    with Client(served.url, token) as client:
        with pytest.raises(NotFound) as missing:
            client.get_lease("l-00000000000000000000")
        assert missing.value.status == 404 and missing.value.title == "Not found"
        lease = client.acquire(POOL, wait=120)
        again = client.request_lease(POOL)
        assert again.existing and again.id == lease.id
        client.release_lease(lease.id)
        with pytest.raises(Conflict) as ended:
            client.renew_lease(lease.id)
        assert ended.value.problem["status"] == 409 and "ended" in ended.value.detail
