"""Where a warm lease's CPU goes: POST /v1/leases + DELETE in-process, under cProfile.

    .venv/bin/python -m tests.benchmarks.profile_lease [--cycles 300] [--top 35]
    .venv/bin/python -m tests.benchmarks.profile_lease --floor [--cycles 2000]

No HTTP server and no load generator: the Flask test client calls the app on a
temporary SQLite file whose pool holds ready worker rows (inserted directly, so
no provisioner runs). It prints the milliseconds of CPU per cycle without the
profiler, then the functions that cost most (cumulative and own time) with it.
This is the tool behind the "per-request CPU" figures in docs/benchmarks.md.

``--floor``: the server side alone, against the warm bench's HTTP floor app
(``http_floor.app``, the same empty routes): each app is called as WSGI with a
prepared environ (no test client, no HTTP), five rounds alternating, and the
median CPU per cycle of each is printed with their ratio. What the warm bench's
"vs HTTP floor" ratio would be if nothing but the application ran (no gunicorn,
no gevent, no clients): its ceiling on this code.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

POOL = "profile"
ADMIN_TOKEN = "profile-admin-token-0123456789"


def _app(db: Path, ready: int) -> tuple[Any, Any]:
    from service.app import create_app
    from service.config import config_from_dict
    from service.startup import prepare_database

    config = config_from_dict(
        {
            "database_url": f"sqlite:///{db}",
            "admin_token": ADMIN_TOKEN,
            "deployment_id": "profile",
            "log_level": "WARNING",
            "pools": [
                {
                    "name": POOL,
                    "os": "ubuntu",
                    "provisioner": "local",
                    "min_ready": 0,
                    "max_workers": ready,
                }
            ],
        }
    )
    engine = prepare_database(config)
    return create_app(config, engine=engine), engine


def _add_ready_workers(engine: Any, count: int, start: int) -> None:
    from service.models import Worker

    now = datetime.now(UTC)
    rows = [
        {
            "id": f"w_prof{start + i:07d}",
            "pool": POOL,
            "state": "ready",
            "created_at": now,
            "state_changed_at": now,
            "ready_at": now + timedelta(microseconds=i),  # distinct, as real ones are
            "provider_id": "0",
            "address": "127.0.0.1",
            "agent_url": "http://127.0.0.1:9",
            "access_token": "wla_profile",
            "create_attempts": 1,
            "destroy_attempts": 0,
        }
        for i in range(count)
    ]
    with engine.begin() as connection:
        connection.execute(Worker.__table__.insert(), rows)  # type: ignore[attr-defined]


def _cycles(client: Any, token: str, count: int) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(count):
        created = client.post("/v1/leases", json={"pool": POOL}, headers=headers)
        assert created.status_code == 201, created.get_data(as_text=True)
        lease_id = created.get_json()["id"]
        released = client.delete(f"/v1/leases/{lease_id}", headers=headers)
        assert released.status_code == 200, released.get_data(as_text=True)


def _wsgi_cycles(app: Any, token: str, count: int) -> None:
    """POST + DELETE straight into the WSGI app: the server's share of a cycle only."""
    from werkzeug.test import EnvironBuilder

    headers = [("Authorization", f"Bearer {token}")]
    body = json.dumps({"pool": POOL}).encode()
    post = EnvironBuilder(
        path="/v1/leases",
        method="POST",
        data=body,
        headers=headers,
        content_type="application/json",
    ).get_environ()
    delete = EnvironBuilder(path="/v1/leases/ID", method="DELETE", headers=headers).get_environ()

    answered: dict[str, str] = {}

    def start_response(status: str, _headers: Any, _exc_info: Any = None) -> None:
        answered["status"] = status

    def call(environ: dict[str, Any], data: bytes = b"") -> bytes:
        environ = {**environ, "wsgi.input": io.BytesIO(data)}
        answer = app(environ, start_response)
        try:
            return b"".join(answer)
        finally:
            getattr(answer, "close", lambda: None)()

    for _ in range(count):
        lease_id = json.loads(call(post, body))["id"]
        assert answered["status"].startswith("201"), answered["status"]
        call({**delete, "PATH_INFO": f"/v1/leases/{lease_id}"})
        assert answered["status"].startswith("200"), answered["status"]


def _floor(app: Any, token: str, cycles: int) -> None:
    from tests.benchmarks.http_floor import app as floor_app

    rounds = 5
    per_round = max(1, cycles // rounds)
    _wsgi_cycles(floor_app, token, 20)  # warm-up
    _wsgi_cycles(app, token, 20)
    cpu_us: dict[str, list[float]] = {"service": [], "floor": []}
    for _ in range(rounds):
        for name, target in (("floor", floor_app), ("service", app)):
            started = time.process_time()
            _wsgi_cycles(target, token, per_round)
            cpu_us[name].append((time.process_time() - started) * 1e6 / per_round)
    service, floor = (statistics.median(cpu_us[name]) for name in ("service", "floor"))
    print(
        f"server-side CPU per POST+DELETE cycle (WSGI, median of {rounds} rounds of "
        f"{per_round}): service {service:.0f} us, HTTP floor app {floor:.0f} us, "
        f"floor / service {floor / service:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument(
        "--floor", action="store_true", help="server-side CPU against the HTTP floor app"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="workerlease-profile-") as tmp:
        app, engine = _app(Path(tmp) / "profile.db", ready=3 * args.cycles + 50)
        client = app.test_client()
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        created = client.post("/v1/admin/tenants", json={"name": "acme"}, headers=admin)
        token = created.get_json()["token"]
        _add_ready_workers(engine, 3 * args.cycles + 50, 0)
        if args.floor:
            _floor(app, token, args.cycles)
            engine.dispose()
            return 0
        _cycles(client, token, 10)  # warm-up: imports, statement caches, connections

        started, cpu = time.perf_counter(), time.process_time()
        _cycles(client, token, args.cycles)
        wall_ms = (time.perf_counter() - started) * 1000 / args.cycles
        cpu_ms = (time.process_time() - cpu) * 1000 / args.cycles
        print(f"per POST+DELETE cycle, no profiler: {wall_ms:.2f} ms wall, {cpu_ms:.2f} ms CPU")

        profiler = cProfile.Profile()
        profiler.enable()
        _cycles(client, token, args.cycles)
        profiler.disable()
        stats = pstats.Stats(profiler).strip_dirs()
        print(f"\n--- cumulative, {args.cycles} cycles ---")
        stats.sort_stats("cumulative").print_stats(args.top)
        print(f"\n--- own time, {args.cycles} cycles ---")
        stats.sort_stats("tottime").print_stats(args.top)
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
