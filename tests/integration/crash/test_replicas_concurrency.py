"""Two replicas on one PostgreSQL database, 64 tenants leasing and releasing at once.

Two ``workerlease serve`` processes (each with its own scheduler) share one
database and one deployment id; a local pool has few ready workers, so most
requests queue (202) and are served as workers come back. 64 client threads,
each a tenant of its own, alternate between the replicas doing lease -> release
cycles. A cycle opens with a volley: ``VOLLEY`` lease requests of the tenant at once,
spread over both replicas, which must all answer with the same lease. While that
lease is pending the tenant asks again, two requests at once (one per replica), and
every answer must again name it: each request is a lease attempt the existing-lease
check and the partial unique index must answer with the one live lease, racing the
scheduler's activation of it. Afterwards the database (not the service's counters)
must show: no worker in two leases or leased twice, no tenant with two overlapping
leases on a pool, every request answered 200/201/202, and, once everything is
released and settled, the deployment's agent processes in /proc are exactly the
workers the database holds live.

Quick mode: up to 300 cycles, for 40 s once 200 are done, asking again every
0.5-1.2 s; ``WORKERLEASE_CRASH_FULL=1``: until 100,000 lease attempts (``POST
/v1/leases`` answered), for at most 1,000 s once 200 cycles are done, asking again
every 0.2-0.5 s. The wall time bounds the run, not the service's speed: a slow
machine runs fewer cycles, never fewer than 200 (short of a hang, bounded by
``HANG_CAP_S``).
"""

from __future__ import annotations

import itertools
import random
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.fernet import Fernet

from tests.integration.crash.support import FULL, Db, settle
from tests.support.postgres import PostgresServer
from tests.support.server import (
    ServerProcess,
    pool,
    reap_zombie_children,
    wait_until,
    worker_root,
)

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

POOL = "hosted-ubuntu"
CLIENTS = 64
CYCLES = 1_000_000 if FULL else 300
ATTEMPTS = 100_000 if FULL else 1_000_000  # lease requests answered; no new cycle after
MIN_CYCLES = 200  # what the assertions need, however slow the machine
WALL_CAP_S = 1000.0 if FULL else 40.0  # no new cycle after this, once MIN_CYCLES started
HANG_CAP_S = WALL_CAP_S + 900.0  # no new cycle after this at all: a hang, not slowness
MIN_READY, MAX_WORKERS = 6, 24
VOLLEY = 4  # a cycle's first lease requests, sent at once, spread over both replicas
ASK_EVERY_S = (0.2, 0.5) if FULL else (0.5, 1.2)  # a pending lease is asked after again
PENDING_LIMIT_S = 120.0  # then the tenant gives up: releases it, pending
GET_EVERY = 4  # every fourth look at a pending lease is a GET, the others two requests
REQUEST_TIMEOUT_S = 60.0
UNAVAILABLE_RETRIES = 5  # a 503 ("retry later") is retried, as the client SDK does


@pytest.fixture
def replicas(tmp_path: Path, postgres_server: PostgresServer) -> Iterator[list[ServerProcess]]:
    url = postgres_server.create_database()
    deployment_id = f"it-rep-{random.randrange(16**8):08x}"
    extra = {
        "database_url": url,
        "encryption_key": Fernet.generate_key().decode(),
        "database_pool_size": 40,
    }
    servers = []
    shared_root = worker_root()  # one work_root for both replicas, reachable by worker uids
    for index in range(2):
        directory = tmp_path / f"r{index}"
        directory.mkdir()
        servers.append(
            ServerProcess(
                directory,
                pools=[
                    pool(
                        min_ready=MIN_READY,
                        max_workers=MAX_WORKERS,
                        provision_timeout="60s",
                        pending_timeout="30m",
                    )
                ],
                scheduler={
                    "interval": "1s",
                    "reconcile_interval": "5s",
                    "max_concurrent_creates": 6,
                },
                extra=extra,
                deployment_id=deployment_id,
                work_root=shared_root / "workers",
            )
        )
    try:
        for server in servers:  # one after the other: the first one upgrades the schema
            server.start()
        yield servers
    finally:
        for server in servers:
            server.close()
        shutil.rmtree(shared_root, ignore_errors=True)


class Clients:
    def __init__(self, replicas: list[ServerProcess], tokens: list[str]) -> None:
        self.replicas = replicas
        self.tokens = tokens
        self.statuses: Counter[str] = Counter()
        self.problems: list[str] = []
        self.cycles = 0
        self.served = 0  # cycles that got an active lease
        self.gave_up = 0  # cycles whose lease was still pending after PENDING_LIMIT_S
        self.attempts = 0  # lease requests (POST /v1/leases) answered
        self.volleys = 0  # lease requests sent at once by one tenant, answered
        self.next_cycle = 0
        self.lock = threading.Lock()
        self.deadline = time.monotonic() + WALL_CAP_S
        self.hang_deadline = time.monotonic() + HANG_CAP_S
        self.lease_ids: set[str] = set()
        self.worker_leases: dict[str, set[str]] = {}
        # Same-tenant races answered with two leases: allowed only when the database
        # shows the service ended the first (its worker failed) before the second began.
        self.split_races: list[tuple[str, str]] = []
        self.split_asks = 0  # of them, between a pending lease and an answer asking again
        self.retried_503 = 0

    def claim_cycle(self) -> int | None:
        with self.lock:
            now = time.monotonic()
            if (
                self.next_cycle >= CYCLES
                or self.attempts >= ATTEMPTS
                or now >= self.hang_deadline
                or (now >= self.deadline and self.next_cycle >= MIN_CYCLES)
            ):
                return None
            self.next_cycle += 1
            return self.next_cycle

    def call(
        self, client: int, replica: int, method: str, path: str, **kwargs: Any
    ) -> dict[str, Any] | None:
        server = self.replicas[replica % 2]
        for retry in range(UNAVAILABLE_RETRIES + 1):
            try:
                # A new connection per request: a kept-alive one may be closed by the server
                # just as it is reused, and that reset would be the client's, not the
                # service's.
                response = requests.request(
                    method,
                    f"{server.url}{path}",
                    timeout=REQUEST_TIMEOUT_S,
                    headers={"Authorization": f"Bearer {self.tokens[client]}"},
                    **kwargs,
                )
            except requests.RequestException as exc:
                with self.lock:
                    self.statuses["no answer"] += 1
                    self.problems.append(f"{method} {path} on replica {replica % 2}: {exc}")
                return None
            # An overloaded machine can starve the database connection (the service
            # answers 503, "retry later", and logs why); every call here is idempotent.
            if response.status_code != 503 or retry == UNAVAILABLE_RETRIES:
                break
            with self.lock:
                self.retried_503 += 1
            time.sleep(0.5 * 2**retry)
        with self.lock:
            self.statuses[str(response.status_code)] += 1
            if response.status_code not in (200, 201, 202):
                self.problems.append(
                    f"{method} {path} on replica {replica % 2}: "
                    f"{response.status_code} {response.text[:300]}"
                )
                return None
        body: dict[str, Any] = response.json()
        with self.lock:
            self.lease_ids.add(body["id"])
            worker = (body.get("worker") or {}).get("id")
            if worker:
                self.worker_leases.setdefault(worker, set()).add(body["id"])
        return body

    def lease(self, client: int, replica: int, wait: int) -> dict[str, Any] | None:
        body = self.call(
            client, replica, "POST", "/v1/leases", json={"pool": POOL, "wait_seconds": wait}
        )
        with self.lock:
            self.attempts += body is not None
        return body

    def volley(
        self, threads: ThreadPoolExecutor, client: int, replica: int, waits: list[int]
    ) -> dict[str, Any] | None:
        """The tenant's lease requests sent at once (replicas alternating): the live lease
        every answer names, or None when one went unanswered (a problem recorded)."""
        answers = list(
            threads.map(
                lambda sent: self.lease(client, replica + sent[0], sent[1]), enumerate(waits)
            )
        )
        if any(answer is None for answer in answers):
            return None
        with self.lock:
            self.volleys += 1
        return self.one_lease([a for a in answers if a])

    def one_lease(
        self, answers: list[dict[str, Any]], asked: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Answers of one tenant's requests that should all name one lease (``asked``:
        the pending one it asked about again). Two leases are allowed only when the
        database shows the first ended (its worker failed) before the second began: the
        pair is kept for ``_unexplained_splits``. The latest live answer goes on."""
        ids = list(dict.fromkeys(a["id"] for a in ([asked] if asked else []) + answers))
        if len(ids) > 1:
            with self.lock:
                self.split_races.extend((ids[0], other) for other in ids[1:])
                self.split_asks += asked is not None
        live = [a for a in answers if a["state"] in ("pending", "active")]
        return live[-1] if live else answers[-1]

    def wait_active(
        self, threads: ThreadPoolExecutor, client: int, replica: int, body: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Ask about a pending lease again until it is active, ended, or the tenant gives
        up; mostly with two lease requests at once (one per replica), as a client
        retrying its request would."""
        rng = random.Random(f"{client}-{body['id']}")
        give_up = time.monotonic() + PENDING_LIMIT_S
        look = 0
        while body["state"] == "pending" and time.monotonic() < give_up:
            time.sleep(rng.uniform(*ASK_EVERY_S))
            look += 1
            if look % GET_EVERY == 0:
                answer = self.call(client, replica + look, "GET", f"/v1/leases/{body['id']}")
                if answer is None:
                    return None
                body = answer
                continue
            answers = list(
                threads.map(
                    lambda r: self.lease(client, r, 0), (replica + look, replica + look + 1)
                )
            )
            if any(answer is None for answer in answers):
                return None
            body = self.one_lease([a for a in answers if a], asked=body)
        return body

    def run(self, client: int) -> None:
        rng = random.Random(client)
        threads = ThreadPoolExecutor(VOLLEY)
        try:
            for turn in range(1_000_000):
                if self.claim_cycle() is None:
                    return
                replica = client + turn
                waits = [rng.randint(0, 3) for _ in range(VOLLEY)]
                body = self.volley(threads, client, replica, waits)
                if body is not None:
                    body = self.wait_active(threads, client, replica, body)
                if body is None:
                    return
                active = body["state"] == "active"
                if active:
                    time.sleep(rng.uniform(0.0, 0.05))
                released = self.call(client, replica + 1, "DELETE", f"/v1/leases/{body['id']}")
                if released is None:
                    return
                if released["state"] not in ("released", "expired", "failed"):
                    with self.lock:
                        self.problems.append(f"release of {body['id']} gave {released['state']}")
                with self.lock:
                    self.cycles += 1
                    self.served += active
                    self.gave_up += not active
        finally:
            threads.shutdown(wait=True)


def test_two_replicas_64_tenants_lease_and_release(replicas: list[ServerProcess]) -> None:
    first = replicas[0]
    db = Db(first.config["database_url"])
    tokens = [first.create_tenant(f"tenant-{i:02d}")["token"] for i in range(CLIENTS)]
    first.wait_ready_workers(MIN_READY, timeout=120)

    clients = Clients(replicas, tokens)
    started = time.monotonic()
    threads = [threading.Thread(target=clients.run, args=(i,), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    # A cycle claimed just before the cap may still wait for its lease, then release it.
    last_cycle_s = PENDING_LIMIT_S + ASK_EVERY_S[1] + 4 * REQUEST_TIMEOUT_S
    for thread in threads:
        thread.join(max(1.0, clients.hang_deadline - time.monotonic() + last_cycle_s))
    elapsed = time.monotonic() - started
    stuck = sum(t.is_alive() for t in threads)
    print(
        f"{clients.cycles} cycles ({clients.served} with a worker, {clients.gave_up} gave "
        f"up) in {elapsed:.1f}s by {CLIENTS} tenants on 2 replicas; "
        f"answers {dict(clients.statuses)} ({clients.retried_503} 503s retried); "
        f"{clients.attempts} lease attempts ({clients.volleys} volleys of {VOLLEY}); "
        f"{len(clients.split_races)} same-tenant answers naming two leases "
        f"({clients.split_asks} on asking again)"
    )
    assert stuck == 0, f"{stuck} client threads still waiting"

    # -- from the database: nobody shared a worker, nobody held two leases at once --------
    leases = db.leases()
    assert clients.lease_ids <= set(leases), "a lease a client was given is not in the database"
    assert db.doubly_leased_workers() == []
    assert {w: ids for w, ids in clients.worker_leases.items() if len(ids) > 1} == {}
    assert db.tenants_with_two_live() == []
    order = _audit_order(db)
    overlaps = []
    by_tenant: dict[tuple[str, str], list[str]] = {}
    for row in leases.values():
        by_tenant.setdefault((row["tenant_id"], row["pool"]), []).append(row["id"])
    for history in by_tenant.values():
        history.sort(key=lambda lease: order[lease][0])
        for before, after in itertools.pairwise(history):
            ended = order[before][1]
            if ended is None or ended > order[after][0]:
                overlaps.append((leases[before], leases[after]))
    assert overlaps == [], f"a tenant held two leases on a pool at once: {overlaps[:5]}"
    assert _unexplained_splits(clients.split_races, leases, order) == []
    activated = db.query("SELECT count(*) FROM leases WHERE worker_id IS NOT NULL")[0][0]
    assert activated >= clients.served

    # -- every request answered ------------------------------------------------------------
    unanswered = {k: n for k, n in clients.statuses.items() if k not in ("200", "201", "202")}
    assert unanswered == {}, f"{unanswered}: {clients.problems[:10]}"
    assert clients.problems == []
    assert clients.cycles >= min(CYCLES, MIN_CYCLES), f"only {clients.cycles} cycles"
    assert clients.served >= clients.cycles * 0.9, "most tenants never got a worker"

    # -- everything released: agents in /proc equal the live rows -----------------------------
    live = db.query("SELECT count(*) FROM leases WHERE state IN ('pending', 'active')")[0][0]
    assert live == 0

    def reap(pids: set[int]) -> None:
        for server in replicas:
            server.seen_agent_pids |= pids
        reap_zombie_children(lambda info: info.pid in replicas[0].seen_agent_pids)

    snap, took = settle(
        db,
        first.deployment_id,
        120,
        reap=reap,
        min_s=6,
        quiet=lambda s: not s.in_progress and sorted(s.rows.values()) == ["ready"] * MIN_READY,
    )
    assert snap is not None and snap.equal(), snap.describe() if snap else "no snapshot"
    assert sorted(snap.rows.values()) == ["ready"] * MIN_READY, snap.describe()
    print(f"settled after {took:.1f}s: {len(snap.agents)} agents = {len(snap.live)} live rows")
    wait_until(lambda: first.pool_counts()["ready"] == MIN_READY, 60)


def _audit_order(db: Db) -> dict[str, tuple[int, int | None]]:
    """Each lease's first audit row and the one that ended it, by id: the order the
    transactions wrote them in. A lease's times are taken before its transaction runs
    (a request's, or a scheduler pass's start, seconds earlier on a loaded machine), so
    they can disagree with that order; the ids cannot. A new lease's transaction read
    that the tenant held none live, after the ending transaction committed, so its
    first row comes after the other's end row (one sequence on PostgreSQL)."""
    rows = db.query(
        "SELECT subject_id, min(id), "
        "min(CASE WHEN to_state IN ('released', 'expired', 'revoked', 'failed') THEN id END) "
        "FROM events WHERE kind = 'lease' GROUP BY subject_id"
    )
    return {str(lease): (first, ended) for lease, first, ended in rows}


def _unexplained_splits(
    splits: list[tuple[str, str]],
    leases: dict[str, dict[str, Any]],
    order: dict[str, tuple[int, int | None]],
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Answers to one tenant's requests name two leases only if the first one had ended
    before the second was created (in the audit log's order), and not by the tenant (who
    released neither before both answers came): its worker failed, and a request still
    on its way then rightly got a new lease. Anything else is a race the unique index
    should have won."""
    unexplained = []
    for one, other in splits:
        earlier, later = sorted((one, other), key=lambda lease: order[lease][0])
        ended = order[earlier][1]
        ended_first = ended is not None and ended < order[later][0]
        if not ended_first or leases[earlier]["end_reason"] == "released":
            unexplained.append((leases[earlier], leases[later]))
    return unexplained
