"""Figures 1 and 2: warm lease over HTTP against a real ``workerlease serve``, and its floors.

Per database kind, in one run:

1. ``serve`` (its default web settings: 1 gevent worker; ``run.py --web-workers N``
   for more, the HTTP floor then gets as many) with one ``local``
   pool whose ``min_ready == max_workers == R``; the harness waits until R agents
   are ready and nothing is provisioning or destroying, then runs a *burst*: c
   clients (distinct tenants) each do ``POST /v1/leases`` (must be 201) then
   ``DELETE``, at most R - margin leases in all, so the pool never runs dry and
   the provisioner is never in the measured path. Bursts repeat after a refill.
2. With ``serve`` stopped, on the same database (file or server): the raw-SQL
   floor and the service's own transaction functions, same clients and cycles,
   each on freshly inserted ready worker rows.
3. The HTTP floor (empty Flask routes, same gunicorn settings) once per run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.benchmarks import drivers
from tests.benchmarks.common import ROOT, LoadResult, ratio, run_load
from tests.support.server import (
    ServerProcess,
    free_port,
    pool,
    port_listening,
    proc_info,
    process_ids,
    wait_until,
)

POOL = "bench"
MARGIN = 8


@dataclass(frozen=True)
class Burst:
    """One way of running each burst; every burst is run both ways, alternating: as the
    service runs (the scheduler refilling beside the burst: on this host that starts a
    local agent process per released worker), and with the scheduler stopped for the
    burst, the web process alone against the HTTP floor, which also runs alone (issue
    15's ratio)."""

    key: str  # of the figures, per level
    scheduler: str  # "running" or "paused", as the tables show it
    ratio_prefix: str  # of its ratios to the HTTP floor


BURSTS = (
    Burst("service_http", "running", ""),
    Burst("service_http_scheduler_paused", "paused", "paused_"),
)


class BenchServer(ServerProcess):
    """``workerlease serve`` with its default web settings and a ``bench-`` deployment id."""

    def __init__(self, tmp: Path, **kwargs: Any) -> None:
        super().__init__(tmp, **kwargs)
        self.deployment_id = f"bench-{uuid.uuid4().hex[:12]}"
        self.config["deployment_id"] = self.deployment_id
        self.config["log_level"] = "WARNING"
        self.write_config()

    def env(self) -> dict[str, str]:
        env = super().env()
        if not str(self.config.get("database_url", "sqlite")).startswith("sqlite"):
            from cryptography.fernet import Fernet

            env["WORKERLEASE_ENCRYPTION_KEY"] = Fernet.generate_key().decode()
        return env

    def revoke_live(self) -> int:
        """End leases a failed burst left behind (e.g. a 202), so the pool can refill."""
        live = self.admin("GET", "/v1/admin/leases", params={"state": "live", "limit": 500})
        ids = [lease["id"] for lease in live.json()["leases"]]
        for lease_id in ids:
            self.admin("DELETE", f"/v1/admin/leases/{lease_id}")
        return len(ids)

    def scheduler_pid(self) -> int:
        """The scheduler ``serve`` spawned: the master's child whose command is ``scheduler``."""
        assert self.process is not None
        for pid in process_ids():
            info = proc_info(pid)
            if info is None or info.ppid != self.process.pid or info.state == "Z":
                continue
            with contextlib.suppress(OSError):
                if b"scheduler" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                    return pid
        raise RuntimeError("serve has no scheduler process")

    @contextlib.contextmanager
    def scheduler_paused(self, paused: bool) -> Iterator[None]:
        """Stop the scheduler (SIGSTOP) for the block, so that no refill runs beside it.

        On this host each refill starts a ``local`` agent, a Python process of its own on
        the same two cores; in production the workers are other machines. Rings sent
        meanwhile wait in the doorbell's socket and are answered on SIGCONT.
        """
        if not paused:
            yield
            return
        pid = self.scheduler_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    def wait_full(self, ready: int, timeout: float = 300) -> None:
        def full() -> bool:
            c = self.pool_counts(POOL)
            return c["ready"] >= ready and c["provisioning"] == 0 and c["destroying"] == 0

        wait_until(
            full,
            timeout,
            interval=0.5,
            message=lambda: f"pool never refilled: {self.pool_counts(POOL)}",
        )


def seed_ready_workers(url: str, count: int) -> None:
    """Ready worker rows without a machine behind them (the service is stopped)."""
    from service.db import make_engine
    from service.models import Worker

    now = datetime.now(UTC) - timedelta(minutes=5)
    rows = [
        {
            "id": f"w_floor{uuid.uuid4().hex[:16]}",
            "pool": POOL,
            "state": "ready",
            "created_at": now,
            "state_changed_at": now,
            "ready_at": now + timedelta(microseconds=i),
            "access_token": "wla_floor",
            "create_attempts": 1,
            "destroy_attempts": 0,
        }
        for i in range(count)
    ]
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            # Leases a failed service burst left live would collide with the floor's.
            conn.exec_driver_sql(
                "UPDATE leases SET state = 'revoked', end_reason = 'revoked' "
                "WHERE state IN ('pending', 'active')"
            )
            conn.execute(Worker.__table__.insert(), rows)  # type: ignore[attr-defined]
    finally:
        engine.dispose()


def run_database(
    kind: str,
    url: str | None,
    levels: list[int],
    ready: int,
    bursts: int,
    log: Any,
    web_workers: int = 1,
) -> dict[str, Any]:
    """Warm lease + SQL floors on one database kind; ``url`` None means a fresh SQLite file.
    ``web_workers``: ``serve --workers``."""
    tmp = Path(tempfile.mkdtemp(prefix=f"wl-bench-{kind}-"))
    extra = {"database_url": url} if url else None
    server = BenchServer(
        tmp,
        pools=[pool(POOL, min_ready=ready, max_workers=ready)],
        extra=extra,
        serve_args=["--workers", str(web_workers)],
    )
    plan = {c: max(1, (ready - MARGIN) // c) for c in levels}
    out: dict[str, Any] = {"ready_workers": ready, "bursts": bursts, "levels": {}}
    try:
        t0 = time.monotonic()
        server.start(timeout=60)
        tenants = [server.create_tenant(f"bench-{i}") for i in range(max(levels))]
        server.wait_full(ready)
        out["initial_fill_s"] = round(time.monotonic() - t0, 1)
        log(f"  {kind}: {ready} ready workers after {out['initial_fill_s']} s")
        params = {"port": server.port, "pool": POOL, "tokens": [t["token"] for t in tenants]}
        # Warm-up burst, not measured: the web worker imports and compiles on first use.
        run_load(drivers.SERVICE_HTTP, params, min(8, max(levels)), 2)
        refills: list[float] = []
        for c in levels:
            parts: dict[str, list[LoadResult]] = {burst.key: [] for burst in BURSTS}
            for _ in range(bursts):
                for burst in BURSTS:  # alternating, so both meet the same machine
                    t1 = time.monotonic()
                    server.wait_full(ready)
                    refills.append(time.monotonic() - t1)
                    with server.scheduler_paused(burst.scheduler == "paused"):
                        parts[burst.key].append(run_load(drivers.SERVICE_HTTP, params, c, plan[c]))
                    if parts[burst.key][-1].errors:
                        log(f"  {kind} c={c}: burst errors, revoked {server.revoke_live()} leases")
            out["levels"][c] = {}
            for burst in BURSTS:
                result = LoadResult.merge(parts[burst.key])
                out["levels"][c][burst.key] = result.as_dict()
                log(f"  {kind} {burst.key} c={c}: {_brief(result)}")
        out["refill_wait_s_max"] = round(max(refills), 1)
    finally:
        server.close()
    db_url = url or f"sqlite:///{server.db_path}"
    tenant_ids = [t["id"] for t in tenants]
    for c in levels:
        iterations = plan[c] * bursts
        for name, driver in (
            ("sql_floor", drivers.FLOOR_SQL),
            ("service_txn", drivers.SERVICE_TXN),
        ):
            seed_ready_workers(db_url, c * (iterations + 1) + MARGIN)  # +1: warm-up cycle
            result = run_load(
                driver, {"url": db_url, "pool": POOL, "tenant_ids": tenant_ids}, c, iterations
            )
            out["levels"][c][name] = result.as_dict()
            log(f"  {kind} {name} c={c}: {_brief(result)}")
    if url is None:
        with contextlib.suppress(OSError):
            for path in tmp.glob("workerlease.db*"):
                path.unlink()
    return out


def run_http_floor(
    levels: list[int], iterations: dict[int, int], log: Any, web_workers: int = 1
) -> dict[str, Any]:
    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="wl-bench-floor-")) / "floor.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.benchmarks.http_floor",
                "--port",
                str(port),
                "--workers",
                str(web_workers),
            ],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    out: dict[str, Any] = {}
    try:
        wait_until(lambda: port_listening(port), 30, message="HTTP floor never listened")
        params = {"port": port, "pool": POOL, "tokens": ["floor-token"] * max(levels)}
        for c in levels:
            result = run_load(drivers.FLOOR_HTTP, params, c, iterations[c])
            out[c] = result.as_dict()
            log(f"  http floor c={c}: {_brief(result)}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return out


def add_ratios(db: dict[str, Any], http_floor: dict[int, dict[str, Any]]) -> None:
    """service/floor for latency (p50, p99) and throughput, per concurrency level."""
    for c, figures in db["levels"].items():
        floor = http_floor.get(c)
        sql, txn = figures.get("sql_floor"), figures.get("service_txn")
        ratios: dict[str, Any] = {}
        for burst in BURSTS:
            service = figures.get(burst.key)
            if not (floor and service):
                continue
            prefix = burst.ratio_prefix
            ratios[f"{prefix}http_p50_vs_http_floor"] = ratio(
                service["acquire"]["p50_ms"], floor["acquire"]["p50_ms"]
            )
            ratios[f"{prefix}http_p99_vs_http_floor"] = ratio(
                service["acquire"]["p99_ms"], floor["acquire"]["p99_ms"]
            )
            ratios[f"{prefix}throughput_vs_http_floor"] = ratio(
                service["cycles_per_s"], floor["cycles_per_s"]
            )
        if sql and txn:
            ratios["txn_p50_vs_sql_floor"] = ratio(
                txn["acquire"]["p50_ms"], sql["acquire"]["p50_ms"]
            )
            ratios["txn_p99_vs_sql_floor"] = ratio(
                txn["acquire"]["p99_ms"], sql["acquire"]["p99_ms"]
            )
            ratios["txn_throughput_vs_sql_floor"] = ratio(txn["cycles_per_s"], sql["cycles_per_s"])
            # What a lease cycle (acquire + commit, release + commit) costs against the
            # same cycle through the plain driver: issue 15's "within 3x", at 1 client
            # the transactions' own cost, at more their contention too.
            ratios["txn_cycle_time_vs_sql_floor"] = ratio(sql["cycles_per_s"], txn["cycles_per_s"])
            ratios["http_p50_vs_sql_floor"] = ratio(
                service["acquire"]["p50_ms"], sql["acquire"]["p50_ms"]
            )
        figures["ratios"] = ratios


def _brief(result: LoadResult) -> str:
    d = result.as_dict()
    a = d["acquire"]
    err = f" errors={d['errors']} ({d['first_error']})" if d["errors"] else ""
    return (
        f"n={a['n']} p50={a['p50_ms']:.1f} p95={a['p95_ms']:.1f} p99={a['p99_ms']:.1f} ms "
        f"{d['cycles_per_s']:.0f} cycles/s{err}"
    )
