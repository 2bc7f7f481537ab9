"""Tasks at scale (issue 11) against one real ``workerlease serve`` on SQLite.

Real agents would be a thousand processes. Instead the database is made with
``workerlease db upgrade`` and seeded, before ``serve`` starts, with the service's own
tables: ready workers whose worker token the harness knows (only its hash is
stored, as the ready callback does), tenants each holding an active lease with a
running task on its own worker, and ready workers in a ``bench`` pool for the warm
lease. The scheduler is off (``scheduler.enabled: false``): these rows have no
machine behind them, and its health pass would fail them. Nothing in the measured
requests needs it; the warm pool simply has enough ready rows for every cycle.

1. **Warm lease, quiet**: 8 clients, bursts of POST /v1/leases + DELETE.
2. **Dispatch, quiet**: a leased worker's agent waits in its poll; a task is submitted;
   the time until the poll's answer has it. One at a time.
3. **Idle polls and followed logs**: from separate processes (asyncio), I agents
   long-poll ``POST /v1/workers/<id>/poll`` (``wait_seconds`` 20); F agents send one
   timestamped line every 0.5 s to their running task's log, and F tenants follow
   those logs (``GET .../log?offset=N&wait_seconds=30``). Once the poll gauge shows
   all I held: the warm bursts again, dispatch again, gauges sampled throughout. Log
   latency (line made -> the follower has it) comes from the lines' timestamps.
4. **Log flood**: one task's agent sends 50 MiB in 1 MiB chunks as fast as the
   service takes them, stopping when told to discard (the log cap); tasks follow one
   another while the warm bursts run.

Every connection goes to 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.benchmarks import drivers, task_clients
from tests.benchmarks.common import LoadResult, percentile, ratio, run_load, summarize
from tests.benchmarks.warm import BenchServer
from tests.support.server import pool, wait_until

AGENT_POOL = "agents"
WARM_POOL = "bench"
WARM_CLIENTS = 8
HOLD_S = 600  # the load processes' own bound; the harness stops them long before


@dataclass(frozen=True)
class Sizes:
    idle: int  # idle agents long-polling
    follows: int  # running tasks: agent sending lines, tenant following
    dispatch: int  # submits timed, per phase
    flood_bytes: int  # one task's output in the flood
    flood_tasks: int  # at most this many flood tasks back to back
    warm_cycles: int  # per client per burst
    bursts: int


# ---- seeding -------------------------------------------------------------------------


@dataclass
class Seeded:
    idle: list[tuple[str, str]]  # (worker id, worker token)
    follows: list[dict[str, str]]  # worker_id, worker_token, tenant_token, lease_id, task_id
    dispatch: dict[str, str]  # the same without a task
    flood: list[dict[str, str]]  # one lease, its worker, tasks one after another
    warm_tokens: list[str]


class _Rows:
    """Rows for the service's tables, as the ready callback and a task submit leave them."""

    def __init__(self) -> None:
        from service.security import TENANT_TOKEN_PREFIX, WORKER_TOKEN_PREFIX

        self.tenant_prefix, self.worker_prefix = TENANT_TOKEN_PREFIX, WORKER_TOKEN_PREFIX
        self.at = datetime.now(UTC) - timedelta(minutes=5)
        self.tenants: list[dict[str, Any]] = []
        self.workers: list[dict[str, Any]] = []
        self.leases: list[dict[str, Any]] = []
        self.tasks: list[dict[str, Any]] = []

    def tenant(self, name: str) -> tuple[str, str]:
        from service.security import hash_token, new_id, new_token

        token = new_token(self.tenant_prefix)
        tenant_id = new_id("t")
        self.tenants.append(
            {
                "id": tenant_id,
                "name": name,
                "token_hash": hash_token(token),
                "enabled": True,
                "created_at": self.at,
            }
        )
        return tenant_id, token

    def worker(self, pool_name: str, state: str) -> tuple[str, str]:
        from service.security import hash_token, new_id, new_token

        token = new_token(self.worker_prefix)
        worker_id = new_id("w")
        n = len(self.workers)
        self.workers.append(
            {
                "id": worker_id,
                "pool": pool_name,
                "state": state,
                "created_at": self.at,
                "state_changed_at": self.at,
                "ready_at": self.at + timedelta(microseconds=n),  # the warm claim's order
                "access_token": f"wla_bench{n}",
                "worker_token_hash": hash_token(token),
                "create_attempts": 1,
                "destroy_attempts": 0,
            }
        )
        return worker_id, token

    def leased(self, name: str) -> dict[str, str]:
        from service.security import new_id

        tenant_id, tenant_token = self.tenant(name)
        worker_id, worker_token = self.worker(AGENT_POOL, "leased")
        lease_id = new_id("l")
        self.leases.append(
            {
                "id": lease_id,
                "tenant_id": tenant_id,
                "pool": AGENT_POOL,
                "state": "active",
                "worker_id": worker_id,
                "created_at": self.at,
                "activated_at": self.at,
                "idle_expires_at": self.at + timedelta(days=1),
                "expires_at": self.at + timedelta(days=3),
            }
        )
        return {
            "tenant_id": tenant_id,
            "tenant_token": tenant_token,
            "worker_id": worker_id,
            "worker_token": worker_token,
            "lease_id": lease_id,
        }

    def running_task(self, run: dict[str, str], seq: int) -> str:
        from service.security import new_id

        task_id = new_id("t")
        self.tasks.append(
            {
                "id": task_id,
                "lease_id": run["lease_id"],
                "seq": seq,
                "tenant_id": run["tenant_id"],
                "pool": AGENT_POOL,
                "worker_id": run["worker_id"],
                "state": "running",
                "shell": "sh",
                "timeout_s": 3600,
                "created_at": self.at,
                "started_at": self.at,
                "script_sha256": "0" * 64,
                "received_bytes": 0,
                "log_bytes": 0,
                "log_capped": False,
            }
        )
        return task_id


def seed(url: str, sizes: Sizes, warm_ready: int) -> Seeded:
    """Insert every row the benchmark needs into a stopped service's database."""
    from sqlmodel import SQLModel

    from service import models  # noqa: F401  (the tables, in SQLModel.metadata)
    from service.db import make_engine

    rows = _Rows()
    idle = [rows.worker(AGENT_POOL, "ready") for _ in range(sizes.idle)]
    follows = []
    for i in range(sizes.follows):
        run = rows.leased(f"follow-{i}")
        follows.append({**run, "task_id": rows.running_task(run, 1)})
    dispatch = rows.leased("dispatch")
    flood_lease = rows.leased("flood")
    flood = [
        {**flood_lease, "task_id": rows.running_task(flood_lease, seq)}
        for seq in range(1, sizes.flood_tasks + 1)
    ]
    warm_tokens = [rows.tenant(f"warm-{i}")[1] for i in range(WARM_CLIENTS)]
    for _ in range(warm_ready):
        rows.worker(WARM_POOL, "ready")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for table, values in (
                ("tenants", rows.tenants),
                ("workers", rows.workers),
                ("leases", rows.leases),
                ("tasks", rows.tasks),
            ):
                conn.execute(SQLModel.metadata.tables[table].insert(), values)
    finally:
        engine.dispose()
    return Seeded(idle, follows, dispatch, flood, warm_tokens)


# ---- the server ----------------------------------------------------------------------


class TaskBenchServer(BenchServer):
    """``serve`` without a scheduler, on a database made and seeded before it starts."""

    def upgrade(self) -> None:
        """``workerlease db upgrade``: the schema and the config's pools, nothing else."""
        command = [sys.executable, "-m", "service.cli", "db", "upgrade"]
        subprocess.run(
            [*command, "--config", str(self.config_path)],
            env=self.env(),
            cwd=self.dir,
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self, timeout: float = 90.0) -> TaskBenchServer:
        """Up when ``/healthz`` answers: ``/readyz`` wants a scheduler heartbeat."""
        process = self.spawn()

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"serve exited with {process.returncode}:\n{self.log_tail()}")
            try:
                return self.request("GET", "/healthz", timeout=2).status_code == 200
            except Exception:
                return False

        wait_until(up, timeout, message=lambda: f"/healthz never 200:\n{self.log_tail()}")
        return self

    def cpu_s(self) -> float:
        """CPU seconds used so far by ``serve``: the gunicorn master and its web worker."""
        assert self.process is not None
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in [self.process.pid, *_children(self.process.pid)]:
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / tick

    def waiters(self) -> dict[str, int]:
        """The task waiters gauge by kind (poll, log) as /metrics shows it."""
        text = self.request("GET", "/metrics").text
        found = re.findall(r'^workerlease_task_waiters\{kind="(\w+)"\} ([0-9.e+]+)$', text, re.M)
        return {kind: int(float(value)) for kind, value in found}


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


class CpuMeter:
    """The server's CPU use over a phase, as a share of one core."""

    def __init__(self, server: TaskBenchServer) -> None:
        self.server = server
        self.cpu, self.wall = server.cpu_s(), time.monotonic()

    def share(self) -> float | None:
        return ratio(self.server.cpu_s() - self.cpu, time.monotonic() - self.wall)


# ---- phases ----------------------------------------------------------------------------


def _warm_bursts(server: TaskBenchServer, tokens: list[str], sizes: Sizes) -> list[LoadResult]:
    params = {"port": server.port, "pool": WARM_POOL, "tokens": tokens}
    return [
        run_load(drivers.SERVICE_HTTP, params, WARM_CLIENTS, sizes.warm_cycles)
        for _ in range(sizes.bursts)
    ]


def _warm(server: TaskBenchServer, tokens: list[str], sizes: Sizes) -> LoadResult:
    return LoadResult.merge(_warm_bursts(server, tokens, sizes))


def _overlap(bursts: list[LoadResult], start: float, end: float) -> float | None:
    """The share of the bursts' busy time that fell within ``[start, end]``."""
    busy = sum(b.elapsed_s for b in bursts)
    shared = sum(
        max(0.0, min(end, b.started + b.elapsed_s) - max(start, b.started)) for b in bursts
    )
    return ratio(shared, busy)


def _spawn(target: Any, *args: Any) -> tuple[Any, Any]:
    ctx = mp.get_context("spawn")
    result_q = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, result_q), daemon=True, name=target.__name__)
    proc.start()
    return proc, result_q


def _collect(procs: list[tuple[Any, Any]], timeout: float) -> dict[str, Any]:
    """Each process's ``(name, figures)``; one that sends none within ``timeout`` is killed,
    and ``missing`` lists it with its exit code (the figures it would have given are absent,
    not zero)."""
    out: dict[str, Any] = {}
    missing: list[str] = []
    deadline = time.monotonic() + timeout
    for proc, result_q in procs:
        failure = None
        try:
            name, value = result_q.get(timeout=max(1.0, deadline - time.monotonic()))
            out[name] = value
        except Exception as exc:  # queue.Empty, or figures that did not unpickle
            failure = type(exc).__name__
        proc.join(max(1.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        if failure:
            missing.append(f"{proc.name}: {failure}, exit code {proc.exitcode}")
    if missing:
        out["missing"] = missing
    return out


DISPATCH_BOUND_S = 60


def _dispatch(server: TaskBenchServer, run: dict[str, str], samples: int) -> dict[str, Any]:
    proc = _spawn(task_clients.run_dispatch, server.port, run, samples, DISPATCH_BOUND_S)
    got = _collect([proc], timeout=DISPATCH_BOUND_S + 90).get("dispatch", {})
    return {
        "dispatch": summarize(got.pop("dispatch", [])),
        "submit": summarize(got.pop("submit", [])),
        "errors": got,
    }


def _under_load(server: TaskBenchServer, seeded: Seeded, sizes: Sizes, log: Any) -> dict[str, Any]:
    """Parts 1 and 3 (and dispatch again) while idle polls wait and logs are followed."""
    stop = mp.get_context("spawn").Event()
    started = time.monotonic()
    procs = [
        _spawn(task_clients.run_pollers, server.port, seeded.idle, HOLD_S, stop),
        _spawn(task_clients.run_producers, server.port, seeded.follows, HOLD_S, stop),
        _spawn(task_clients.run_followers, server.port, seeded.follows, HOLD_S, stop),
    ]
    out: dict[str, Any] = {}
    samples: list[dict[str, int]] = []
    try:
        wait_until(
            lambda: server.waiters().get("poll", 0) >= sizes.idle,
            120,
            interval=1,
            message=lambda: f"polls never reached {sizes.idle}: {server.waiters()}",
        )
        out["polls_held_after_s"] = round(time.monotonic() - started, 1)
        time.sleep(3)  # the log producers and followers in their stride
        window_start = time.monotonic()
        meter = CpuMeter(server)
        samples.append(server.waiters())
        loaded = _warm(server, seeded.warm_tokens, sizes)
        samples.append(server.waiters())
        out["warm"] = loaded.as_dict()
        out["dispatch"] = _dispatch(server, seeded.dispatch, sizes.dispatch)
        samples.append(server.waiters())
        window_end = time.monotonic()
        out["server_cpu_share"] = meter.share()
        log(
            f"  under load: warm p99 {out['warm']['acquire']['p99_ms']} ms; dispatch p50 "
            f"{out['dispatch']['dispatch']['p50_ms']} ms; waiters {samples}"
        )
    finally:
        stop.set()
        got = _collect(procs, timeout=60)
    out["waiter_samples"] = samples
    out["polls_held_min"] = min((s.get("poll", 0) for s in samples), default=0)
    logs_held = [s.get("log", 0) for s in samples]
    out["follows_held_min"] = min(logs_held, default=0)
    out["follows_held_median"] = round(percentile([float(v) for v in logs_held], 50), 1)
    out["pollers"] = got.get("pollers")
    out["producers"] = got.get("producers")
    followers = got.get("followers") or {}
    latency = followers.pop("samples", [])
    # Lines that arrived while the warm bursts and dispatch ran, and all of them.
    in_window = [lat for at, lat in latency if window_start <= at <= window_end]
    out["log_latency"] = summarize(in_window)
    out["log_latency_all"] = summarize([lat for _, lat in latency])
    out["followers"] = followers
    out["missing"] = got.get("missing", [])
    out["window_s"] = round(window_end - window_start, 1)
    return out


def _flood(server: TaskBenchServer, seeded: Seeded, sizes: Sizes, log: Any) -> dict[str, Any]:
    """Part 4: the log flood with the warm bursts beside it."""
    ctx = mp.get_context("spawn")
    go, stop = ctx.Event(), ctx.Event()
    proc = _spawn(task_clients.run_flood, server.port, seeded.flood, sizes.flood_bytes, go, stop)
    time.sleep(2)  # the process is up (spawn imports) before the clock starts
    go.set()
    meter = CpuMeter(server)
    try:
        bursts = _warm_bursts(server, seeded.warm_tokens, sizes)
    finally:
        cpu_share = meter.share()
        stop.set()
        got = _collect([proc], timeout=120).get("flood", {})
    if "error" in got:
        raise RuntimeError(f"log flood failed: {got['error']}")
    done = got.get("tasks", [])
    tenant = seeded.flood[0]["tenant_token"]
    stored = []
    for task in done:
        answer = server.request(
            "GET", f"/v1/leases/{seeded.flood[0]['lease_id']}/tasks/{task['task_id']}", token=tenant
        )
        stored.append(answer.json()["log_bytes"])
    first = done[0] if done else {}
    mib = 1 << 20
    busy = [t["elapsed_s"] for t in done]
    loaded = LoadResult.merge(bursts)
    out: dict[str, Any] = {
        "first_task": {
            "received_mib": round(first.get("received_bytes", 0) / mib, 2),
            "elapsed_s": round(first.get("elapsed_s", 0), 3),
            "mib_per_s": round(first.get("received_bytes", 0) / mib / first["elapsed_s"], 1)
            if first
            else None,
            "chunks": first.get("chunks"),
            "discard": first.get("discard"),
            "stored_bytes": stored[0] if stored else None,
        },
        "tasks": len(done),
        "mib_per_s_all": round(sum(t["received_bytes"] for t in done) / mib / sum(busy), 1)
        if busy
        else None,
        "stored_bytes": stored,
        "chunk_post": summarize([s for t in done for s in t["post_s"]]),
        "warm": loaded.as_dict(),
        "server_cpu_share": cpu_share,
        # How much of the warm bursts' busy time had the flood beside it.
        "overlap": _overlap(bursts, done[0]["start"], got["end"]) if done else None,
    }
    log(
        f"  flood: {out['first_task']['mib_per_s']} MiB/s (first task), "
        f"{out['tasks']} tasks, stored {stored[:1]} bytes; warm p99 "
        f"{out['warm']['acquire']['p99_ms']} ms, overlap {out['overlap']}"
    )
    return out


def run_tasks(sizes: Sizes, log: Any) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="wl-bench-tasks-"))
    # Every warm cycle takes a ready row and nothing refills: enough for all of them.
    warm_ready = WARM_CLIENTS * sizes.warm_cycles * sizes.bursts * 3 + 64
    agents = sizes.idle + sizes.follows + 2
    server = TaskBenchServer(
        tmp,
        pools=[
            pool(AGENT_POOL, min_ready=0, max_workers=agents, capabilities=[]),
            pool(WARM_POOL, min_ready=0, max_workers=warm_ready, capabilities=[]),
        ],
        scheduler={"enabled": False},
    )
    out: dict[str, Any] = {"sizes": sizes.__dict__, "warm_ready_seeded": warm_ready}
    try:
        t0 = time.monotonic()
        server.upgrade()
        seeded = seed(f"sqlite:///{server.db_path}", sizes, warm_ready)
        server.start()
        out["seed_and_start_s"] = round(time.monotonic() - t0, 1)
        log(f"  seeded {agents} agent workers, {warm_ready} warm; serve up")
        params = {"port": server.port, "pool": WARM_POOL, "tokens": seeded.warm_tokens}
        run_load(drivers.SERVICE_HTTP, params, 4, 2)  # warm-up: imports, first compiles
        meter = CpuMeter(server)
        quiet = _warm(server, seeded.warm_tokens, sizes)
        out["warm_quiet"] = quiet.as_dict()
        out["warm_quiet"]["server_cpu_share"] = meter.share()
        out["dispatch_quiet"] = _dispatch(server, seeded.dispatch, sizes.dispatch)
        log(
            f"  quiet: warm p99 {out['warm_quiet']['acquire']['p99_ms']} ms; dispatch p50 "
            f"{out['dispatch_quiet']['dispatch']['p50_ms']} ms"
        )
        out["under_load"] = _under_load(server, seeded, sizes, log)
        out["flood"] = _flood(server, seeded, sizes, log)
        out["ratios"] = {
            "warm_p99_under_load_vs_quiet": ratio(
                out["under_load"]["warm"]["acquire"]["p99_ms"],
                out["warm_quiet"]["acquire"]["p99_ms"],
            ),
            "warm_p99_flood_vs_quiet": ratio(
                out["flood"]["warm"]["acquire"]["p99_ms"], out["warm_quiet"]["acquire"]["p99_ms"]
            ),
            "dispatch_p50_under_load_vs_quiet": ratio(
                out["under_load"]["dispatch"]["dispatch"]["p50_ms"],
                out["dispatch_quiet"]["dispatch"]["p50_ms"],
            ),
        }
        out["serve_log"] = str(server.log_path)
    finally:
        server.close()
        with contextlib.suppress(OSError):
            for path in tmp.glob("workerlease.db*"):
                path.unlink()
    return out


def sizes_from(settings: dict[str, Any]) -> Sizes:
    return Sizes(
        idle=settings["task_idle"],
        follows=settings["task_follows"],
        dispatch=settings["task_dispatch"],
        flood_bytes=settings["task_flood_mib"] << 20,
        flood_tasks=settings["task_flood_tasks"],
        warm_cycles=settings["task_warm_cycles"],
        bursts=settings["bursts"],
    )


if __name__ == "__main__":  # a tiny run by hand: python -m tests.benchmarks.tasks
    small = Sizes(
        idle=20, follows=4, dispatch=5, flood_bytes=20 << 20, flood_tasks=2, warm_cycles=4, bursts=1
    )
    print(json.dumps(run_tasks(small, print), indent=2, default=str))
