"""Shared by the benchmarks: percentiles, the multi-process load generator, machine facts.

The load generator runs each client as a thread of its own with its own connection
(HTTP keep-alive or a database connection), spread over a few ``spawn``-ed processes
so that the clients never share the harness's interpreter or any connection made
before a fork. All clients start on one signal; each records the latency of its
acquire and release calls with ``time.monotonic`` (system-wide on Linux, so the
processes' clocks agree).
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import platform
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parents[2]
MAX_LOAD_PROCESSES = 4


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(seconds: list[float]) -> dict[str, float]:
    """n, p50/p95/p99/max/mean in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p95_ms": round(percentile(ms, 95), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "max_ms": round(max(ms), 3) if ms else float("nan"),
        "mean_ms": round(sum(ms) / len(ms), 3) if ms else float("nan"),
    }


class Driver(Protocol):
    """One client: ``setup`` once (connect, warm up), then acquire/release cycles."""

    def setup(self) -> None: ...

    def acquire(self) -> Any: ...

    def release(self, token: Any) -> None: ...

    def close(self) -> None: ...


@dataclass
class LoadResult:
    clients: int
    cycles: int
    errors: int
    first_error: str | None
    elapsed_s: float
    acquire: list[float]
    release: list[float]
    started: float = 0.0  # time.monotonic() when the clients started (the first burst's)

    @property
    def cycles_per_s(self) -> float:
        return self.cycles / self.elapsed_s if self.elapsed_s > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "cycles": self.cycles,
            "errors": self.errors,
            "first_error": self.first_error,
            "elapsed_s": round(self.elapsed_s, 4),
            "cycles_per_s": round(self.cycles_per_s, 2),
            "acquire": summarize(self.acquire),
            "release": summarize(self.release),
        }

    @staticmethod
    def merge(parts: list[LoadResult]) -> LoadResult:
        """Several bursts as one result: latencies pooled, throughput over the busy time."""
        return LoadResult(
            clients=parts[0].clients,
            cycles=sum(p.cycles for p in parts),
            errors=sum(p.errors for p in parts),
            first_error=next((p.first_error for p in parts if p.first_error), None),
            elapsed_s=sum(p.elapsed_s for p in parts),
            acquire=[x for p in parts for x in p.acquire],
            release=[x for p in parts for x in p.release],
            started=min(p.started for p in parts),
        )


def _load_driver(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _client_thread(driver: Driver, iterations: int, go: Any, out: dict[str, Any]) -> None:
    acquire: list[float] = []
    release: list[float] = []
    errors = 0
    first_error = None
    go.wait()
    out["start"] = time.monotonic()
    for _ in range(iterations):
        try:
            t0 = time.monotonic()
            token = driver.acquire()
            t1 = time.monotonic()
            driver.release(token)
            t2 = time.monotonic()
        except Exception as exc:  # counted and reported, the run goes on
            errors += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"[:300]
            continue
        acquire.append(t1 - t0)
        release.append(t2 - t1)
    out["end"] = time.monotonic()
    out.update(acquire=acquire, release=release, errors=errors, first_error=first_error)
    with contextlib.suppress(Exception):  # closing a benchmark connection is best effort
        driver.close()


def _process_main(
    driver_path: str,
    params: dict[str, Any],
    indexes: list[int],
    iterations: int,
    ready_q: Any,
    go: Any,
    result_q: Any,
) -> None:
    try:
        cls = _load_driver(driver_path)
        drivers = []
        for index in indexes:
            driver = cls(params, index)
            driver.setup()
            drivers.append(driver)
    except Exception:
        ready_q.put(("error", traceback.format_exc()))
        return
    outs: list[dict[str, Any]] = [{} for _ in drivers]
    threads = [
        threading.Thread(target=_client_thread, args=(d, iterations, go, o), daemon=True)
        for d, o in zip(drivers, outs, strict=True)
    ]
    for thread in threads:
        thread.start()
    ready_q.put(("ready", len(drivers)))
    for thread in threads:
        thread.join()
    result_q.put(outs)


def run_load(
    driver_path: str, params: dict[str, Any], clients: int, iterations: int, timeout_s: float = 300
) -> LoadResult:
    """``clients`` concurrent clients, each ``iterations`` acquire/release cycles."""
    ctx = mp.get_context("spawn")
    n_proc = min(clients, MAX_LOAD_PROCESSES)
    groups = [list(range(i, clients, n_proc)) for i in range(n_proc)]
    ready_q, result_q, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(
            target=_process_main,
            args=(driver_path, params, g, iterations, ready_q, go, result_q),
            daemon=True,
        )
        for g in groups
    ]
    for proc in procs:
        proc.start()
    try:
        ready = 0
        deadline = time.monotonic() + 90
        while ready < clients:
            kind, value = ready_q.get(timeout=max(1.0, deadline - time.monotonic()))
            if kind == "error":
                raise RuntimeError(f"load client failed to start:\n{value}")
            ready += value
        go.set()
        outs: list[dict[str, Any]] = []
        for _ in procs:
            outs.extend(result_q.get(timeout=timeout_s))
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    start = min(o["start"] for o in outs)
    end = max(o["end"] for o in outs)
    acquire = [x for o in outs for x in o["acquire"]]
    return LoadResult(
        clients=clients,
        cycles=len(acquire),
        errors=sum(o["errors"] for o in outs),
        first_error=next((o["first_error"] for o in outs if o["first_error"]), None),
        elapsed_s=end - start,
        acquire=acquire,
        release=[x for o in outs for x in o["release"]],
        started=start,
    )


def ratio(a: float, b: float) -> float | None:
    if not b or b != b or a != a:
        return None
    return round(a / b, 3)


# ---- machine ----------------------------------------------------------------------


def git_commit() -> str | None:
    """The checked-out commit, read from .git directly (no git command is run). In a
    worktree ``.git`` is a file naming its own git dir, whose refs live in the main one."""
    git = ROOT / ".git"
    try:
        if git.is_file():
            git = (ROOT / git.read_text().strip().removeprefix("gitdir: ")).resolve()
        common = (
            git / (git / "commondir").read_text().strip() if (git / "commondir").exists() else git
        )
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        for base in (git, common):
            if (base / ref).exists():
                return (base / ref).read_text().strip()
        for line in (common / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        return None
    return None


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = []
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "loadavg_at_start": load,
    }


def sqlite_version() -> str:
    import sqlite3

    return sqlite3.sqlite_version
