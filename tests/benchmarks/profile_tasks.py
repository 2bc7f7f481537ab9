"""Where a task request's CPU goes: the agent's and the tenant's task calls, in-process.

    .venv/bin/python -m tests.benchmarks.profile_tasks [--calls 400] [--top 30]

Like ``profile_lease``: no HTTP server, the Flask test client on a temporary SQLite
file seeded as ``tests.benchmarks.tasks`` seeds it. It prints the milliseconds of CPU
per call of each kind without the profiler (a log chunk of one line, a log read that
finds a line, one that finds nothing, an idle poll, a warm lease cycle for scale),
then cProfile of a "followed line" (one chunk + one read that finds it): the cost
that the tasks benchmark's followed logs pay twice a second each.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.benchmarks.tasks import AGENT_POOL, WARM_POOL, Sizes, seed

ADMIN_TOKEN = "profile-admin-token-0123456789"


def _app(db: Path) -> Any:
    from service.app import create_app
    from service.config import config_from_dict
    from service.startup import prepare_database

    pools = [
        {"name": name, "os": "ubuntu", "provisioner": "local", "min_ready": 0, "max_workers": 10}
        for name in (AGENT_POOL, WARM_POOL)
    ]
    config = config_from_dict(
        {
            "database_url": f"sqlite:///{db}",
            "admin_token": ADMIN_TOKEN,
            "deployment_id": "profile",
            "log_level": "WARNING",
            "scheduler": {"enabled": False},
            "pools": pools,
        }
    )
    return create_app(config, engine=prepare_database(config))


class Calls:
    """One followed task's calls through the test client, each asserting its answer."""

    def __init__(self, client: Any, run: dict[str, str], idle: tuple[str, str], warm: str):
        self.client, self.run = client, run
        self.agent = {"Authorization": f"Bearer {run['worker_token']}"}
        self.tenant = {"Authorization": f"Bearer {run['tenant_token']}"}
        self.idle_path = f"/v1/workers/{idle[0]}/poll"
        self.idle = {"Authorization": f"Bearer {idle[1]}"}
        self.warm = {"Authorization": f"Bearer {warm}"}
        self.chunk_path = f"/v1/workers/{run['worker_id']}/tasks/{run['task_id']}/log"
        self.log_path = f"/v1/leases/{run['lease_id']}/tasks/{run['task_id']}/log"
        self.sent = 0
        self.read = 0

    def chunk(self) -> None:
        line = f"{self.sent:09d} {time.monotonic():.6f} bench output line\n".encode()
        answer = self.client.post(
            f"{self.chunk_path}?offset={self.sent}",
            data=line,
            headers={**self.agent, "Content-Type": "application/octet-stream"},
        )
        assert answer.status_code == 200, answer.get_data(as_text=True)
        self.sent = answer.get_json()["received"]

    def read_some(self) -> None:
        answer = self.client.get(
            f"{self.log_path}?offset={self.read}&wait_seconds=30", headers=self.tenant
        )
        assert answer.status_code == 200 and answer.data, answer.get_data(as_text=True)
        self.read = int(answer.headers["X-Next-Offset"])

    def read_nothing(self) -> None:
        answer = self.client.get(f"{self.log_path}?offset={self.sent}", headers=self.tenant)
        assert answer.status_code == 200 and not answer.data, answer.status_code

    def followed_line(self) -> None:
        self.chunk()
        self.read_some()

    def idle_poll(self) -> None:
        answer = self.client.post(
            self.idle_path, json={"running": [], "wait_seconds": 0}, headers=self.idle
        )
        assert answer.status_code == 200, answer.get_data(as_text=True)

    def warm_cycle(self) -> None:
        created = self.client.post("/v1/leases", json={"pool": WARM_POOL}, headers=self.warm)
        assert created.status_code == 201, created.get_data(as_text=True)
        lease_id = created.get_json()["id"]
        released = self.client.delete(f"/v1/leases/{lease_id}", headers=self.warm)
        assert released.status_code == 200, released.get_data(as_text=True)


def flood_chunks(client: Any, run: dict[str, str]) -> None:
    """1 MiB chunks to one task until the service says discard: wall and CPU per chunk.
    Wall well above CPU is time in SQLite's C code (the blob, the WAL, its checkpoints),
    during which a gevent worker serves nobody else."""
    from tests.benchmarks.task_clients import CHUNK, _block

    headers = {
        "Authorization": f"Bearer {run['worker_token']}",
        "Content-Type": "application/octet-stream",
    }
    path = f"/v1/workers/{run['worker_id']}/tasks/{run['task_id']}/log"
    block, sent, walls, cpus = _block(), 0, [], []
    while True:
        wall, cpu = time.perf_counter(), time.process_time()
        answer = client.post(f"{path}?offset={sent}", data=block, headers=headers)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        assert answer.status_code == 200, answer.get_data(as_text=True)
        sent = answer.get_json()["received"]
        if answer.get_json()["discard"] or sent > 64 * CHUNK:
            break
    walls.sort()
    print(
        f"  {'1 MiB log chunk, to the cap (' + str(len(walls)) + ' chunks)':48s} "
        f"{sum(cpus) * 1000 / len(cpus):6.2f} ms CPU, wall median "
        f"{walls[len(walls) // 2] * 1000:.1f} ms, max {walls[-1] * 1000:.1f} ms"
    )


def _cpu_ms(call: Callable[[], None], count: int) -> float:
    cpu = time.process_time()
    for _ in range(count):
        call()
    return (time.process_time() - cpu) * 1000 / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    sizes = Sizes(
        idle=1, follows=1, dispatch=0, flood_bytes=0, flood_tasks=1, warm_cycles=0, bursts=0
    )
    with tempfile.TemporaryDirectory(prefix="workerlease-profile-") as tmp:
        db = Path(tmp) / "profile.db"
        app = _app(db)
        seeded = seed(f"sqlite:///{db}", sizes, warm_ready=2 * args.calls + 20)
        calls = Calls(app.test_client(), seeded.follows[0], seeded.idle[0], seeded.warm_tokens[0])
        for name in ("followed_line", "read_nothing", "idle_poll", "warm_cycle"):
            for _ in range(10):  # warm-up: imports, statement caches, connections
                getattr(calls, name)()
        kinds = {
            "log chunk (agent POST, one line)": calls.chunk,
            "log read finding that line (tenant GET)": calls.read_some,
            "log read finding nothing (tenant GET, wait 0)": calls.read_nothing,
            "idle poll (agent POST, wait 0: one look)": calls.idle_poll,
            "warm lease POST + DELETE (two requests)": calls.warm_cycle,
        }
        print("CPU per call, no profiler:")
        for name, call in kinds.items():
            if call == calls.read_some:
                continue  # timed with its chunk below
            print(f"  {name:48s} {_cpu_ms(call, args.calls):6.2f} ms")
        both = _cpu_ms(calls.followed_line, args.calls)
        print(f"  {'followed line (chunk + read that finds it)':48s} {both:6.2f} ms")
        flood_chunks(calls.client, seeded.flood[0])

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            calls.followed_line()
        profiler.disable()
        stats = pstats.Stats(profiler).strip_dirs()
        print(f"\n--- cumulative, {args.calls} followed lines ---")
        stats.sort_stats("cumulative").print_stats(args.top)
        print(f"\n--- own time, {args.calls} followed lines ---")
        stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
