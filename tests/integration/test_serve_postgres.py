"""``serve`` on PostgreSQL: a request waiting on the database leaves the web worker free.

The web worker is one gevent process. psycopg chooses how it waits for the server when
it is first imported, and the gunicorn master imports it before the fork; had the worker
kept that choice (a wait in C), one request waiting on a row lock, or any slow round
trip, would stall every other request of the process until it ended.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests
from cryptography.fernet import Fernet

from tests.support.postgres import PostgresServer
from tests.support.server import ServerProcess, pool, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

POOL = "hosted-ubuntu"


@pytest.fixture
def served(tmp_path: Path, postgres_server: PostgresServer) -> Iterator[tuple[ServerProcess, str]]:
    url = postgres_server.create_database()
    extra = {"database_url": url, "encryption_key": Fernet.generate_key().decode()}
    server = ServerProcess(tmp_path, pools=[pool(POOL, min_ready=1, max_workers=2)], extra=extra)
    try:
        yield server.start(), url
    finally:
        server.close()


def test_a_request_waiting_on_a_row_lock_does_not_stall_the_web_worker(
    served: tuple[ServerProcess, str],
) -> None:
    server, url = served
    server.wait_ready_workers(1)
    token = server.create_tenant("acme")["token"]
    leased = server.request("POST", "/v1/leases", token=token, json={"pool": POOL})
    assert leased.status_code == 201, leased.text
    lease_id = leased.json()["id"]
    released: list[requests.Response] = []

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    # pg_stat_activity is read from a connection of its own: in the blocker's
    # transaction it would be the same snapshot at every look.
    with psycopg.connect(dsn) as blocker, psycopg.connect(dsn, autocommit=True) as watcher:
        blocker.execute("SELECT id FROM leases WHERE id = %s FOR UPDATE", (lease_id,))
        release = threading.Thread(
            target=lambda: released.append(
                server.request("DELETE", f"/v1/leases/{lease_id}", token=token, timeout=120)
            ),
            daemon=True,
        )
        release.start()

        def release_waits_on_the_lock() -> bool:
            row = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database() AND query ILIKE '%%UPDATE leases%%'"
            ).fetchone()
            return bool(row and row[0] == 1)

        wait_until(release_waits_on_the_lock, 60, message="the release never reached the lock")
        # The web worker answers others while that request waits in PostgreSQL.
        assert server.request("GET", "/healthz", timeout=20).status_code == 200
        assert server.request("GET", "/v1/pools", token=token, timeout=20).status_code == 200
        assert not released, "the release went through a held row lock"
        blocker.rollback()
    release.join(60)
    assert released and released[0].status_code == 200, released
    assert released[0].json()["state"] == "released"
