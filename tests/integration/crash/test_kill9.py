"""Crash points: SIGKILL the whole service at random moments, restart it, check nothing leaks.

Each chain runs one ``workerlease serve`` on SQLite with a local pool; per run a
load (tenants leasing, holding, releasing or abandoning leases, an operator
PATCHing ``min_ready`` up and down) makes the service provision, lease, expire
and destroy, and the whole service (gunicorn master, web worker, scheduler) is
SIGKILLed after a random delay (0.2-3 s). It restarts on the same database and,
once it settled, the truth is read from the database and /proc:

* the local agent processes of the deployment are exactly the workers the
  database holds live (provisioning / ready / leased): nothing leaked;
* every lease a client was told about still exists; one the client held
  (201/200 active, not released) is still active on the same worker or ended
  with a recorded ``end_reason``; one it released is released: nothing lost;
* no worker is in two leases or moved to ``leased`` twice: nothing reused.

Quick mode (in ``make test``): 4 runs, one chain of 4 kills, a new random seed each
session. ``WORKERLEASE_CRASH_FULL=1``: 52 runs.
``WORKERLEASE_CRASH_SEED=<n>`` replays a session's random choices.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.crash.support import FULL, CrashStats, Db, Snapshot, settle
from tests.support.server import ServerProcess, pool, reap_zombie_children

pytestmark = pytest.mark.integration

POOL = "hosted-ubuntu"
KILLS_PER_CHAIN = 4
RUNS = int(os.environ.get("WORKERLEASE_CRASH_RUNS", "52" if FULL else "4"))
CHAINS = max(1, -(-RUNS // KILLS_PER_CHAIN))
SEED = int(os.environ.get("WORKERLEASE_CRASH_SEED", str(random.SystemRandom().randrange(2**31))))
TENANTS = 4
# After a restart, agents must equal the live rows within this (provision_timeout 8 s,
# 1 s passes, a 3 s reconcile; it takes a few seconds, but under a loaded 2-core machine
# 30 s was too tight, hence 60). A crash in the middle of a destroy batch currently leaves
# the batch's rows claimed for service.workers.CLAIM_FOR (90 s) with their agents running:
# that run counts as leaked (see the report / docs of this suite); 60 s stays below the
# ~80 s such a claim still has to run after the restart, so it still does.
SETTLE_S = float(os.environ.get("WORKERLEASE_CRASH_SETTLE_S", "60"))
SLOW_S = 20.0
RECONCILE_S = 3.0
REQUEST_TIMEOUT_S = 8.0


@dataclass
class Known:
    """What a client was told about one lease."""

    lease_id: str
    tenant: str
    worker_id: str | None = None
    status: str = "pending"  # pending | active | releasing | released | ended


@dataclass
class Ledger:
    leases: dict[str, Known] = field(default_factory=dict)
    worker_leases: dict[str, set[str]] = field(default_factory=dict)  # worker -> lease ids
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list[str] = field(default_factory=list)

    def saw(self, tenant: str, body: dict[str, Any]) -> Known:
        with self.lock:
            known = self.leases.setdefault(body["id"], Known(body["id"], tenant))
            worker = (body.get("worker") or {}).get("id")
            if worker:
                known.worker_id = known.worker_id or worker
                if known.worker_id != worker:
                    self.errors.append(
                        f"lease {body['id']} moved from {known.worker_id} to {worker}"
                    )
                self.worker_leases.setdefault(worker, set()).add(body["id"])
            if body["state"] == "active" and known.status == "pending":
                known.status = "active"
            elif body["state"] not in ("pending", "active"):
                known.status = "released" if body["state"] == "released" else "ended"
            return known

    def double_leased(self) -> dict[str, set[str]]:
        with self.lock:
            return {w: ids for w, ids in self.worker_leases.items() if len(ids) > 1}


class Load:
    """Tenants leasing and releasing, an operator patching min_ready, until stopped."""

    def __init__(
        self,
        server: ServerProcess,
        tokens: list[str],
        ledger: Ledger,
        rng: random.Random,
        abandon: float,
    ) -> None:
        self.server = server
        self.tokens = tokens
        self.ledger = ledger
        self.abandon = abandon
        self.stop = threading.Event()
        self.seeds = [rng.randrange(2**31) for _ in range(len(tokens) + 1)]
        self.threads = [
            threading.Thread(target=self._tenant, args=(t, s), daemon=True)
            for t, s in zip(tokens, self.seeds, strict=False)
        ]
        self.threads.append(
            threading.Thread(target=self._operator, args=(self.seeds[-1],), daemon=True)
        )
        self.requests = 0

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def halt(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(REQUEST_TIMEOUT_S + 5)
        assert not any(t.is_alive() for t in self.threads), "load threads did not stop"

    def _call(self, method: str, path: str, token: str, **kwargs: Any) -> requests.Response:
        self.requests += 1
        return requests.request(
            method,
            f"{self.server.url}{path}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=REQUEST_TIMEOUT_S,
            **kwargs,
        )

    def _tenant(self, token: str, seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(10_000):
                if self.stop.is_set():
                    return
                response = self._call(
                    "POST",
                    "/v1/leases",
                    token,
                    json={"pool": POOL, "wait_seconds": rng.choice([0, 1])},
                )
                if response.status_code not in (200, 201, 202):
                    self.ledger.errors.append(
                        f"lease answered {response.status_code}: {response.text[:200]}"
                    )
                    return
                known = self.ledger.saw(token, response.json())
                if self.stop.wait(rng.uniform(0.0, 0.8)):
                    return
                if known.status == "active" and rng.random() < self.abandon:
                    # Leave it: it expires (short idle timeout) or comes back as 200.
                    if self.stop.wait(rng.uniform(0.5, 2.5)):
                        return
                    continue
                with self.ledger.lock:
                    before, known.status = known.status, "releasing"
                response = self._call("DELETE", f"/v1/leases/{known.lease_id}", token)
                if response.status_code != 200:
                    self.ledger.errors.append(f"release answered {response.status_code}")
                    return
                body = response.json()
                with self.ledger.lock:
                    known.status = "released" if body["state"] == "released" else "ended"
                    if before == "pending" and body.get("worker"):
                        known.worker_id = body["worker"]["id"]
        except requests.RequestException:
            return  # the service was killed under us: whatever was in flight is unknown

    def _operator(self, seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(10_000):
                response = self._call(
                    "PATCH",
                    f"/v1/admin/pools/{POOL}",
                    self.server.admin_token or "",
                    json={"min_ready": rng.randint(0, 4)},
                )
                if response.status_code != 200:
                    self.ledger.errors.append(f"patch answered {response.status_code}")
                    return
                if self.stop.wait(rng.uniform(0.3, 1.0)):
                    return
        except requests.RequestException:
            return


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    short_idle = request.param % 2 == 0
    server = ServerProcess(
        tmp_path,
        pools=[
            pool(
                min_ready=2,
                max_workers=6,
                provision_timeout="8s",
                lease_idle_timeout="2s" if short_idle else "60m",
            )
        ],
        scheduler={"interval": "1s", "reconcile_interval": f"{RECONCILE_S:.0f}s"},
    )
    yield server
    server.close()


def _reaper(server: ServerProcess) -> Any:
    def reap(pids: set[int]) -> None:
        server.seen_agent_pids |= pids
        seen = server.seen_agent_pids
        reap_zombie_children(lambda info: info.pid in seen)

    return reap


@pytest.mark.parametrize("server", range(CHAINS), indirect=True, ids=lambda c: f"chain{c}")
def test_sigkill_at_random_moments_loses_and_leaks_nothing(
    server: ServerProcess, crash_stats: CrashStats, request: pytest.FixtureRequest
) -> None:
    chain = request.node.callspec.params["server"]
    runs = min(KILLS_PER_CHAIN, RUNS - chain * KILLS_PER_CHAIN)
    seed = SEED * 1000 + chain
    rng = random.Random(seed)
    crash_stats.used = True
    crash_stats.seeds.add(SEED)
    print(f"crash chain {chain}: seed={SEED} (WORKERLEASE_CRASH_SEED={SEED}) runs={runs}")
    db = Db(f"sqlite:///{server.db_path}")
    server.start()
    tokens = [server.create_tenant(f"crash-{chain}-{i}")["token"] for i in range(TENANTS)]
    ledger = Ledger()
    failures: list[str] = []
    abandon = 0.35 if chain % 2 == 0 else 0.15
    for run in range(runs):
        load = Load(server, tokens, ledger, rng, abandon)
        delay = rng.uniform(0.2, 3.0)
        load.start()
        time.sleep(delay)
        server.kill()
        load.halt()
        server.start()
        # At least one reconcile pass (at start, then every 3 s) before the verdict.
        snap, took = settle(
            db, server.deployment_id, SETTLE_S, reap=_reaper(server), min_s=RECONCILE_S + 0.5
        )
        problems = _check(db, ledger, snap)
        with crash_stats.lock:
            crash_stats.runs += 1
            crash_stats.kills += 1
            crash_stats.leaked += problems["leaked"]
            crash_stats.lost += problems["lost"]
            crash_stats.double_leased += problems["double_leased"]
            if took > SLOW_S:
                crash_stats.notes.append(
                    f"chain {chain} run {run}: agents equal live rows only after {took:.0f} s "
                    f"(a claim of the killed process had to lapse, CLAIM_FOR=90 s)"
                )
        print(
            f"run {run}: kill after {delay:.2f}s, {load.requests} requests, "
            f"settled in {took:.1f}s, {problems}"
        )
        if any(problems[k] for k in ("leaked", "lost", "double_leased")) or ledger.errors:
            failures.append(
                f"run {run} (seed {SEED}, chain {chain}, kill after {delay:.2f}s): "
                f"{problems} client errors={ledger.errors[:5]}\n"
                f"{snap.describe() if snap else 'no snapshot'}"
            )
            break
    assert not failures, "\n".join(failures) + "\n" + server.log_tail(80)


def _check(db: Db, ledger: Ledger, snap: Snapshot | None) -> dict[str, Any]:
    """Count leaks, lost leases and doubly leased workers, from the database and /proc."""
    problems: dict[str, Any] = {"leaked": 0, "lost": 0, "double_leased": 0, "details": []}
    if snap is None or not snap.equal():
        extra, missing = snap.mismatch() if snap else (set(), set())
        problems["leaked"] = len(extra) + len(missing) + (snap.duplicate_agents if snap else 1)
        problems["details"].append(snap.describe() if snap else "database never still")
    rows, workers = db.leases_and_workers()  # one snapshot: the service runs on
    with ledger.lock:
        known = list(ledger.leases.values())
    for lease in known:
        row = rows.get(lease.lease_id)
        why = None
        if row is None:
            why = "missing from the database"
        elif lease.status in ("active", "releasing") and lease.worker_id is not None:
            if row["worker_id"] != lease.worker_id:
                why = f"worker changed {lease.worker_id} -> {row['worker_id']}"
            elif row["state"] == "active":
                if workers.get(lease.worker_id) != "leased":
                    why = f"active lease on worker {workers.get(lease.worker_id)}"
            elif not row["end_reason"] or row["ended_at"] is None:
                why = f"ended ({row['state']}) without end_reason"
        elif lease.status == "released" and row["state"] != "released":
            why = f"released by the client, {row['state']} in the database"
        if (
            why is None
            and row is not None
            and row["state"] not in ("pending", "active")
            and not row["end_reason"]
        ):
            why = f"{row['state']} without end_reason"
        if why:
            problems["lost"] += 1
            problems["details"].append(f"lease {lease.lease_id}: {why}")
    for row in rows.values():  # every active lease holds a leased worker
        if row["state"] == "active" and workers.get(row["worker_id"]) != "leased":
            problems["lost"] += 1
            problems["details"].append(
                f"active lease {row['id']} on {workers.get(row['worker_id'])}"
            )
    doubled = db.doubly_leased_workers()
    client_doubled = ledger.double_leased()
    problems["double_leased"] = len(doubled) + len(client_doubled) + len(db.tenants_with_two_live())
    if doubled or client_doubled:
        problems["details"].append(f"doubly leased: db={doubled} client={client_doubled}")
    return problems
