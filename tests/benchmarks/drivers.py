"""Load-generator clients: one lease cycle (acquire, then release) four ways.

* :class:`ServiceHTTP` - the real thing: ``POST /v1/leases`` (201) then ``DELETE``.
* :class:`FloorHTTP` - the same two requests against an empty Flask route under the
  same gunicorn settings (``tests.benchmarks.http_floor``).
* :class:`FloorSQL` - the allocation as a raw SQL transaction through the plain
  driver (sqlite3 / psycopg): claim the oldest ready worker, mark it leased, insert
  the lease, commit; release ends the lease and sends the worker to destroying.
* :class:`ServiceTxn` - the service's own transaction functions
  (``leasing.acquire`` / ``leasing.release`` in ``session_scope``) without HTTP.

Each is built in a load process from ``(params, index)``: ``index`` picks the
client's tenant, so every client is a distinct tenant.
"""

from __future__ import annotations

import http.client
import json
import socket
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any


class NoDelayHTTPConnection(http.client.HTTPConnection):
    """``http.client`` with Nagle's algorithm off, as curl, httpx, urllib3 and asyncio have it.

    ``http.client`` sends a request's headers and its body in two writes. With Nagle on,
    the body waits for the server to acknowledge the headers, and the server delays that
    acknowledgement (up to 40 ms on Linux) while it waits for the body: one POST in
    twenty or so took 40-100 ms here, which was the client, not the service.
    """

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _HTTPClient:
    def __init__(self, params: dict[str, Any], index: int) -> None:
        self.port = int(params["port"])
        self.pool = params["pool"]
        self.token = params["tokens"][index]
        self.conn: http.client.HTTPConnection | None = None
        self.headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        self.body = json.dumps({"pool": self.pool})

    def _request(self, method: str, path: str, body: str | None = None) -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = NoDelayHTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            self.conn.request(method, path, body=body, headers=self.headers)
            response = self.conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            raise

    def setup(self) -> None:
        status, body = self._request("GET", "/v1/pools")  # connect and authenticate once
        if status != 200:
            raise RuntimeError(f"warm-up GET /v1/pools: {status} {body[:200]!r}")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class ServiceHTTP(_HTTPClient):
    def acquire(self) -> str:
        status, body = self._request("POST", "/v1/leases", self.body)
        if status != 201:
            raise RuntimeError(f"POST /v1/leases: {status} {body[:200]!r}")
        lease_id: str = json.loads(body)["id"]
        return lease_id

    def release(self, lease_id: str) -> None:
        status, body = self._request("DELETE", f"/v1/leases/{lease_id}")
        if status != 200:
            raise RuntimeError(f"DELETE /v1/leases/{lease_id}: {status} {body[:200]!r}")


class FloorHTTP(_HTTPClient):
    def acquire(self) -> str:
        status, body = self._request("POST", "/v1/leases", self.body)
        if status != 201:
            raise RuntimeError(f"floor POST: {status}")
        lease_id: str = json.loads(body)["id"]
        return lease_id

    def release(self, lease_id: str) -> None:
        status, _ = self._request("DELETE", f"/v1/leases/{lease_id}")
        if status != 200:
            raise RuntimeError(f"floor DELETE: {status}")


# ---- raw SQL -------------------------------------------------------------------------

SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"  # what SQLAlchemy's DateTime stores in SQLite


class FloorSQL:
    """The allocation as the plain driver does it, no ORM, no audit rows, no pre-checks."""

    CLAIM = (
        "SELECT id FROM workers WHERE pool = {p} AND state = 'ready' ORDER BY ready_at, id LIMIT 1"
    )

    def __init__(self, params: dict[str, Any], index: int) -> None:
        self.url: str = params["url"]
        self.pool: str = params["pool"]
        self.tenant_id: str = params["tenant_ids"][index]
        self.sqlite = self.url.startswith("sqlite")
        self.conn: Any = None

    def setup(self) -> None:
        if self.sqlite:
            import sqlite3

            self.conn = sqlite3.connect(
                self.url.removeprefix("sqlite:///"),
                timeout=30,
                isolation_level=None,
                check_same_thread=False,
            )
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000"):
                self.conn.execute(f"PRAGMA {pragma}")
            self.mark = "?"
        else:
            import psycopg

            dsn = self.url.replace("postgresql+psycopg://", "postgresql://")
            self.conn = psycopg.connect(dsn, autocommit=False)
            self.mark = "%s"
        m = self.mark
        self.claim = self.CLAIM.format(p=m) + ("" if self.sqlite else " FOR UPDATE SKIP LOCKED")
        self.lease_worker = (
            f"UPDATE workers SET state = 'leased', state_changed_at = {m} WHERE id = {m}"
        )
        self.insert_lease = (
            "INSERT INTO leases (id, tenant_id, pool, state, worker_id, created_at, "
            "activated_at, idle_expires_at, expires_at) "
            f"VALUES ({m}, {m}, {m}, 'active', {m}, {m}, {m}, {m}, {m})"
        )
        self.end_lease = (
            f"UPDATE leases SET state = 'released', ended_at = {m}, "
            f"end_reason = 'released' WHERE id = {m} AND tenant_id = {m}"
        )
        self.destroy_worker = (
            f"UPDATE workers SET state = 'destroying', state_changed_at = {m}, "
            f"next_attempt_at = {m} WHERE id = {m}"
        )
        self.release(self.acquire())  # warm-up cycle, not measured (one extra ready row)

    def _now(self) -> Any:
        now = datetime.now(UTC)
        return now.replace(tzinfo=None).strftime(SQLITE_TIME) if self.sqlite else now

    def _begin(self) -> Any:
        cur = self.conn.cursor()
        if self.sqlite:
            cur.execute("BEGIN IMMEDIATE")
        return cur

    def acquire(self) -> tuple[str, str]:
        cur = self._begin()
        try:
            cur.execute(self.claim, (self.pool,))
            row = cur.fetchone()
            if row is None:
                raise RuntimeError("floor: no ready worker")
            worker_id = row[0]
            now = datetime.now(UTC)
            t = self._now()
            idle = now + timedelta(hours=1)
            life = now + timedelta(hours=72)
            if self.sqlite:
                idle = idle.replace(tzinfo=None).strftime(SQLITE_TIME)  # type: ignore[assignment]
                life = life.replace(tzinfo=None).strftime(SQLITE_TIME)  # type: ignore[assignment]
            cur.execute(self.lease_worker, (t, worker_id))
            lease_id = f"l_{uuid.uuid4().hex[:20]}"
            cur.execute(
                self.insert_lease,
                (lease_id, self.tenant_id, self.pool, worker_id, t, t, idle, life),
            )
            self._commit(cur)
        except BaseException:
            self.conn.rollback() if not self.sqlite else cur.execute("ROLLBACK")
            raise
        return lease_id, worker_id

    def release(self, token: tuple[str, str]) -> None:
        lease_id, worker_id = token
        cur = self._begin()
        t = self._now()
        cur.execute(self.end_lease, (t, lease_id, self.tenant_id))
        cur.execute(self.destroy_worker, (t, t, worker_id))
        self._commit(cur)

    def _commit(self, cur: Any) -> None:
        if self.sqlite:
            cur.execute("COMMIT")
        else:
            self.conn.commit()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class ServiceTxn:
    """``leasing.acquire`` + commit and ``leasing.release`` + commit, as the views call them."""

    def __init__(self, params: dict[str, Any], index: int) -> None:
        self.url: str = params["url"]
        self.pool: str = params["pool"]
        self.tenant_id: str = params["tenant_ids"][index]

    def setup(self) -> None:
        from service.db import make_engine, session_factory

        self.engine = make_engine(self.url)  # the service's default pool size
        self.factory = session_factory(self.engine)
        self.release(self.acquire())  # warm-up: imports, statement compilation, connection

    def acquire(self) -> str:
        from service import leasing
        from service.db import session_scope

        with session_scope(self.factory) as session:
            acquired = leasing.acquire(session, self.tenant_id, self.pool, datetime.now(UTC))
            if acquired.outcome != leasing.Outcome.ACTIVE:
                raise RuntimeError(f"service txn: {acquired.outcome}")
            return acquired.lease.id

    def release(self, lease_id: str) -> None:
        from service import leasing
        from service.db import session_scope

        with session_scope(self.factory) as session:
            leasing.release(session, self.tenant_id, lease_id, datetime.now(UTC))

    def close(self) -> None:
        self.engine.dispose()


SERVICE_HTTP = "tests.benchmarks.drivers:ServiceHTTP"
FLOOR_HTTP = "tests.benchmarks.drivers:FloorHTTP"
FLOOR_SQL = "tests.benchmarks.drivers:FloorSQL"
SERVICE_TXN = "tests.benchmarks.drivers:ServiceTxn"
