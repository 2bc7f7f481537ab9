"""Dispatch across web processes (PostgreSQL, ``serve --workers 2``).

An agent long-polls for work and its tenant submits a task, each on a connection of its
own; gunicorn gives each connection to either web process, so in about half the rounds
the submit and the poll are in different processes. Without wakes between processes
(``service/wakes.py``) those rounds waited for the poller's 0.5 s re-read; with them a
round trip. Every round opens new connections; the figure is every sample's dispatch
(submit answered -> the agent's poll answered with the task) and each round's median.
"""

from __future__ import annotations

import queue
import statistics
import tempfile
from pathlib import Path
from typing import Any

from tests.benchmarks import task_clients, tasks
from tests.benchmarks.common import summarize
from tests.support.server import pool

WEB_WORKERS = 2
ROUND_BOUND_S = 60


def run_wakes(rounds: int, samples: int, pg_url: str, log: Any) -> dict[str, Any]:
    sizes = tasks.Sizes(
        idle=2, follows=1, dispatch=samples, flood_bytes=1, flood_tasks=1, warm_cycles=1, bursts=1
    )
    server = tasks.TaskBenchServer(
        Path(tempfile.mkdtemp(prefix="wl-bench-wakes-")),
        pools=[
            pool(tasks.AGENT_POOL, min_ready=0, max_workers=16, capabilities=[]),
            pool(tasks.WARM_POOL, min_ready=0, max_workers=16, capabilities=[]),
        ],
        scheduler={"enabled": False},
        extra={"database_url": pg_url},
        serve_args=["--workers", str(WEB_WORKERS)],
    )
    log(f"wakes: dispatch with serve --workers {WEB_WORKERS} on PostgreSQL, {rounds} rounds")
    try:
        server.upgrade()
        seeded = tasks.seed(pg_url, sizes, warm_ready=2)
        server.start()
        every: list[float] = []
        medians: list[float] = []
        errors: dict[str, int] = {}
        for _ in range(rounds):
            results: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
            task_clients.run_dispatch(server.port, seeded.dispatch, samples, ROUND_BOUND_S, results)
            got = results.get(timeout=5)[1]
            dispatch = got.pop("dispatch", [])
            got.pop("submit", None)
            for name, count in got.items():
                errors[name] = errors.get(name, 0) + count
            every += dispatch
            if dispatch:
                medians.append(round(1000 * statistics.median(dispatch), 1))
        out: dict[str, Any] = {
            "web_workers": WEB_WORKERS,
            "dispatch": summarize(every),
            "round_medians_ms": medians,
            "errors": errors,
        }
        log(f"  dispatch p50 {out['dispatch']['p50_ms']} ms; round medians {medians} ms")
        return out
    finally:
        server.close()
