"""Refill after a burst (issue 14): how soon the warm pool is warm again, doorbell on vs off.

``serve`` with one ``local`` pool (``min_ready = N``, ``max_workers = 2N``) and the
scheduler at its default ``interval`` (5 s). N tenants take the N ready workers at
once (one thread each, ``POST /v1/leases``, must be 201) and hold them; the clock
runs from the burst's start until the pool shows N ready workers again (the admin
pool counts, polled every 20 ms). The leases are then released and the harness
waits until the pool is quiet (N ready, nothing provisioning or destroying) and a
random pause (0-5 s, seeded) puts the next burst at a random phase of the 5 s pass.

Doorbell on: a warm take rings the scheduler's demand pass, which plans the
replacements at once. Off (``scheduler.doorbell: false``): the next ``maintain``
pass does. Both in the same run, one server after the other. The ring's own cost
(a datagram to a bound socket, ``SocketBell.ring``) is timed in-process, and
``NOTIFY`` (``PostgresBell.ring``) when a PostgreSQL server is given.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from tests.benchmarks.common import ratio, summarize
from tests.benchmarks.warm import POOL, BenchServer
from tests.support.server import pool, wait_until

POLL_S = 0.02


def _burst(server: BenchServer, tokens: list[str]) -> tuple[list[float], list[str]]:
    """Every tenant takes a lease at once; returns the latencies and the lease ids."""
    latencies: list[float] = [0.0] * len(tokens)
    ids: list[str] = [""] * len(tokens)
    go = threading.Barrier(len(tokens) + 1)

    def take(i: int) -> None:
        session = requests.Session()
        session.get(f"{server.url}/healthz", timeout=30)  # connect before the clock starts
        go.wait()
        t0 = time.monotonic()
        response = session.post(
            f"{server.url}/v1/leases",
            json={"pool": POOL},
            headers={"Authorization": f"Bearer {tokens[i]}"},
            timeout=30,
        )
        latencies[i] = time.monotonic() - t0
        if response.status_code == 201:
            ids[i] = response.json()["id"]
        session.close()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(tokens))]
    for thread in threads:
        thread.start()
    go.wait()
    for thread in threads:
        thread.join(60)
    return latencies, ids


def _quiet(server: BenchServer, ready: int) -> None:
    def quiet() -> bool:
        c = server.pool_counts(POOL)
        return c["ready"] >= ready and c["provisioning"] == 0 and c["destroying"] == 0

    wait_until(quiet, 300, interval=0.2, message=lambda: f"never quiet: {server.pool_counts(POOL)}")


def _sample(server: BenchServer, tokens: list[str], ready: int) -> dict[str, Any]:
    t0 = time.monotonic()
    latencies, ids = _burst(server, tokens)
    taken = sum(1 for lease_id in ids if lease_id)
    refilled = None
    deadline = t0 + 120
    while time.monotonic() < deadline:
        if server.pool_counts(POOL)["ready"] >= ready:
            refilled = time.monotonic() - t0
            break
        time.sleep(POLL_S)
    for lease_id, token in zip(ids, tokens, strict=True):
        if lease_id:
            server.request("DELETE", f"/v1/leases/{lease_id}", token=token)
    return {"refill_s": refilled, "taken": taken, "lease_s": latencies}


def run_side(doorbell: bool, ready: int, samples: int, seed: int, log: Any) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"wl-bench-refill-{'on' if doorbell else 'off'}-"))
    server = BenchServer(
        tmp,
        pools=[pool(POOL, min_ready=ready, max_workers=2 * ready)],
        scheduler={"interval": "5s", "doorbell": doorbell},
    )
    pause = random.Random(seed)
    refills: list[float] = []
    leases: list[float] = []
    missed = 0
    try:
        server.start(timeout=60)
        tokens = [server.create_tenant(f"refill-{i}")["token"] for i in range(ready)]
        for _ in range(samples):
            _quiet(server, ready)
            time.sleep(pause.uniform(0, 5))
            server.http.close()  # its keep-alive connection may have idled past the server's 5 s
            sample = _sample(server, tokens, ready)
            missed += ready - sample["taken"]
            leases += sample["lease_s"]
            if sample["refill_s"] is not None:
                refills.append(sample["refill_s"])
            log(f"  doorbell {'on' if doorbell else 'off'}: refill {sample['refill_s']} s")
    finally:
        server.close()
    return {
        "doorbell": doorbell,
        "samples": refills,
        "refill_median_s": round(statistics.median(refills), 3) if refills else None,
        "refill_max_s": round(max(refills), 3) if refills else None,
        "warm_lease_in_burst": summarize(leases),
        "leases_not_warm": missed,
    }


def ring_cost(postgres_url: str | None, rings: int = 20000) -> dict[str, Any]:
    """Microseconds per ``ring()`` (what a lease waits for): a datagram to a bound abstract
    socket; on PostgreSQL a flag for the bell's sender thread, and the NOTIFY it sends."""
    from service.doorbell import PostgresBell, SocketBell, socket_address

    address = socket_address(f"/tmp/wl-bench-ring-{uuid.uuid4().hex}.db")
    bell = SocketBell(address)
    listener = bell.listener()  # bound: the datagrams are delivered (and drained below)
    out: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        for i in range(rings):
            bell.ring()
            if i % 100 == 99:
                listener.wait(0.001)  # drain, as the scheduler would
        out["socket_us"] = round((time.perf_counter() - t0) / rings * 1e6, 2)
    finally:
        listener.close()
    if postgres_url:
        from service.db import make_engine

        engine = make_engine(postgres_url)
        n = rings // 20
        try:
            pg = PostgresBell(engine)
            pg.notify()  # the pool's first connection
            t0 = time.perf_counter()
            for _ in range(n):
                pg.notify()
            out["notify_us"] = round((time.perf_counter() - t0) / n * 1e6, 2)
            t0 = time.perf_counter()
            for _ in range(n):
                pg.ring()  # what the lease waits for: a flag for the bell's own thread
            out["postgres_ring_us"] = round((time.perf_counter() - t0) / n * 1e6, 2)
        finally:
            engine.dispose()
    return out


def run_refill(
    ready: int, samples: int, postgres_url: str | None, log: Any, seed: int = 14
) -> dict[str, Any]:
    log(f"refill after a burst of {ready} warm takes, doorbell on then off, interval 5 s")
    on = run_side(True, ready, samples, seed, log)
    off = run_side(False, ready, samples, seed, log)
    return {
        "ready": ready,
        "on": on,
        "off": off,
        "refill_on_vs_off": ratio(on["refill_median_s"] or 0, off["refill_median_s"] or 0),
        "ring_cost": ring_cost(postgres_url),
    }
