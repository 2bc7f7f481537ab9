"""Figure 3: the scheduler's passes and the admin list endpoints as history and live leases grow.

In-process, on the ``fake`` provisioner (``tests.support.fakes``), so no machine is
started. For each live size L, a fresh database gets L active leases (leased
workers the fake cloud knows as running, idle deadlines a day away, so nothing
expires), 10 ready workers (``min_ready`` is 10: refill has nothing to do) and
history: ended leases with their destroyed workers and two audit events each,
added in steps to 1k, 10k and 100k. At each step the harness times
``passes.maintain`` (expire, health, activate, trim, refill), ``passes.destroy`` and
``passes.reconcile``, and the admin list endpoints' first page through the Flask
test client. On SQLite it also records ``EXPLAIN QUERY PLAN`` for every statement
those issue at the largest size and flags full scans of the big tables.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from tests.benchmarks.common import ratio

POOL = "scale"
ADMIN_TOKEN = "bench-admin-token-0123456789"
MIN_READY = 10
ENDPOINTS = {
    "admin_leases": "/v1/admin/leases",
    "admin_leases_live": "/v1/admin/leases?state=live",
    "admin_workers": "/v1/admin/workers",
    "admin_workers_live": "/v1/admin/workers?state=live",
    "admin_events": "/v1/admin/events",
    "admin_pools": "/v1/admin/pools",
}
BIG_TABLES = ("leases", "workers", "events")


def _config(url: str, live: int) -> Any:
    from cryptography.fernet import Fernet

    from service.config import config_from_dict

    key = None if url.startswith("sqlite") else Fernet.generate_key().decode()
    return config_from_dict(
        {
            "encryption_key": key,
            "database_url": url,
            "admin_token": ADMIN_TOKEN,
            "deployment_id": "bench-scale",
            "scheduler": {"interval": 1},
            "pools": [
                {
                    "name": POOL,
                    "os": "ubuntu",
                    "provisioner": "fake",
                    "min_ready": MIN_READY,
                    "max_workers": live + 1000,
                }
            ],
        }
    )


class Dataset:
    """Seeds rows in bulk (SQLAlchemy core inserts of dicts)."""

    def __init__(self, engine: Engine, live: int) -> None:
        self.engine = engine
        self.live = live
        self.history = 0
        self.now = datetime.now(UTC)

    def _insert(self, table: Any, rows: list[dict[str, Any]], chunk: int = 20_000) -> None:
        with self.engine.begin() as conn:
            for i in range(0, len(rows), chunk):
                conn.execute(table.insert(), rows[i : i + chunk])

    def seed_live(self) -> None:
        from provisioners.base import WorkerSpec
        from service.models import Lease, Tenant, Worker
        from tests.support.fakes import CLOUD, FakeResource

        past = self.now - timedelta(hours=1)
        self.tenants = [f"t_bench{i:07d}" for i in range(self.live)]
        self._insert(
            Tenant.__table__,
            [  # type: ignore[attr-defined]
                {
                    "id": t,
                    "name": t,
                    "token_hash": uuid.uuid4().hex,
                    "enabled": True,
                    "created_at": past,
                }
                for t in self.tenants
            ],
        )
        workers, leases = [], []
        for i, tenant in enumerate(self.tenants):
            wid = f"w_live{i:07d}"
            workers.append(self._worker(wid, "leased", past))
            leases.append(
                {
                    "id": f"l_live{i:07d}",
                    "tenant_id": tenant,
                    "pool": POOL,
                    "state": "active",
                    "worker_id": wid,
                    "created_at": past,
                    "activated_at": past,
                    "idle_expires_at": self.now + timedelta(days=1),
                    "expires_at": self.now + timedelta(days=3),
                }
            )
        workers += [self._worker(f"w_ready{i:03d}", "ready", past) for i in range(MIN_READY)]
        self._insert(Worker.__table__, workers)  # type: ignore[attr-defined]
        self._insert(Lease.__table__, leases)  # type: ignore[attr-defined]
        for row in workers:
            spec = WorkerSpec(
                worker_id=row["id"],
                pool=POOL,
                os="ubuntu",
                deployment_id="bench-scale",
                service_url="http://127.0.0.1:9",
                bootstrap_token="",
            )
            CLOUD.resources[row["id"]] = FakeResource(spec)

    def _worker(self, wid: str, state: str, at: datetime) -> dict[str, Any]:
        return {
            "id": wid,
            "pool": POOL,
            "state": state,
            "created_at": at,
            "state_changed_at": at,
            "ready_at": at,
            "provider_id": f"fake-{wid}",
            "address": "127.0.0.1",
            "agent_url": "http://127.0.0.1:9",
            "access_token": "wla_bench",
            "create_attempts": 1,
            "destroy_attempts": 0,
        }

    def grow_history(self, total: int) -> None:
        """Ended leases (released) with destroyed workers and two events each, up to ``total``."""
        from service.models import Event, Lease, Worker

        start, self.history = self.history, total
        workers, leases, events = [], [], []
        for i in range(start, total):
            at = self.now - timedelta(days=30) + timedelta(seconds=i)
            wid, lid = f"w_hist{i:07d}", f"l_hist{i:07d}"
            tenant = self.tenants[i % len(self.tenants)]
            worker = self._worker(wid, "destroyed", at)
            worker["provider_id"] = f"gone-{wid}"
            workers.append(worker)
            leases.append(
                {
                    "id": lid,
                    "tenant_id": tenant,
                    "pool": POOL,
                    "state": "released",
                    "worker_id": wid,
                    "created_at": at,
                    "activated_at": at,
                    "idle_expires_at": at + timedelta(hours=1),
                    "expires_at": at + timedelta(hours=72),
                    "ended_at": at + timedelta(minutes=5),
                    "end_reason": "released",
                }
            )
            events.append(
                {
                    "at": at,
                    "kind": "lease",
                    "subject_id": lid,
                    "from_state": "active",
                    "to_state": "released",
                    "reason": "released by tenant",
                    "pool": POOL,
                    "tenant_id": tenant,
                }
            )
            events.append(
                {
                    "at": at,
                    "kind": "worker",
                    "subject_id": wid,
                    "from_state": "destroying",
                    "to_state": "destroyed",
                    "reason": "provisioner confirmed",
                    "pool": POOL,
                    "tenant_id": None,
                }
            )
        self._insert(Worker.__table__, workers)  # type: ignore[attr-defined]
        self._insert(Lease.__table__, leases)  # type: ignore[attr-defined]
        self._insert(Event.__table__, events)  # type: ignore[attr-defined]
        if self.engine.dialect.name == "postgresql":
            with self.engine.connect() as conn:
                conn.exec_driver_sql("COMMIT")
                conn.exec_driver_sql("ANALYZE")


def _timed(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    fn()  # warm-up, not counted
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {
        "median_ms": round(statistics.median(times) * 1000, 2),
        "max_ms": round(max(times) * 1000, 2),
        "n": repeats,
    }


def _measure(rt: Any, client: Any, repeats: int) -> dict[str, Any]:
    from service.passes.destroy import destroy
    from service.passes.maintain import maintain
    from service.passes.reconcile import reconcile

    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def get(path: str) -> Callable[[], None]:
        def call() -> None:
            response = client.get(path, headers=headers)
            assert response.status_code == 200, response.get_data(as_text=True)[:300]

        return call

    out = {
        "maintain": _timed(lambda: maintain(rt), repeats),
        "destroy": _timed(lambda: destroy(rt), repeats),
        "reconcile": _timed(lambda: reconcile(rt), repeats),
    }
    for name, path in ENDPOINTS.items():
        out[name] = _timed(get(path), repeats * 2)
    return out


def _explain(engine: Engine, rt: Any, client: Any) -> list[dict[str, Any]]:
    """EXPLAIN QUERY PLAN of every statement one maintain pass and the admin pages issue."""
    from service.passes.destroy import destroy
    from service.passes.maintain import maintain

    seen: dict[str, Any] = {}

    def capture(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, executemany: bool
    ) -> None:
        if not executemany and statement.lstrip().upper().startswith("SELECT"):
            seen.setdefault(statement, parameters)

    event.listen(engine, "before_cursor_execute", capture)
    try:
        maintain(rt)
        destroy(rt)
        for path in ENDPOINTS.values():
            client.get(path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    plans = []
    with engine.connect() as conn:
        for statement, parameters in seen.items():
            if not any(f"FROM {t}" in statement or f"JOIN {t}" in statement for t in BIG_TABLES):
                continue
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
            detail = [str(r[-1]) for r in rows]
            scans = [
                d
                for d in detail
                if d.startswith("SCAN") and any(d.split()[1] == t for t in BIG_TABLES)
            ]
            plans.append(
                {"sql": " ".join(statement.split())[:400], "plan": detail, "full_scans": scans}
            )
    return plans


def run_scale(
    url_factory: Callable[[], str],
    kind: str,
    live_sizes: list[int],
    history_sizes: list[int],
    repeats: int,
    log: Any,
) -> dict[str, Any]:
    from service.app import create_app
    from service.db import make_engine
    from service.passes.runtime import build_runtime
    from service.startup import prepare_database
    from tests.support import fakes

    out: dict[str, Any] = {"live": {}, "plans": None}
    for live in live_sizes:
        fakes.install()
        url = url_factory()
        config = _config(url, live)
        engine = make_engine(url, config.database_pool_size)
        prepare_database(config, engine)
        rt = build_runtime(config, engine, "http://127.0.0.1:9")
        client = create_app(config, engine=engine).test_client()
        data = Dataset(engine, live)
        t0 = time.monotonic()
        data.seed_live()
        per_history: dict[int, Any] = {}
        try:
            for history in history_sizes:
                data.grow_history(history)
                seeded = time.monotonic() - t0
                per_history[history] = _measure(rt, client, repeats)
                m = per_history[history]
                log(
                    f"  {kind} live={live} history={history} (seeded {seeded:.0f} s): "
                    f"maintain {m['maintain']['median_ms']} ms, destroy "
                    f"{m['destroy']['median_ms']} ms, reconcile {m['reconcile']['median_ms']} ms,"
                    f" admin leases {m['admin_leases']['median_ms']} ms, workers "
                    f"{m['admin_workers']['median_ms']} ms, events "
                    f"{m['admin_events']['median_ms']} ms"
                )
                t0 = time.monotonic()
            if kind == "sqlite" and live == live_sizes[-1]:
                out["plans"] = _explain(engine, rt, client)
        finally:
            rt.provisioners.close()
            engine.dispose()
        out["live"][live] = {"history": per_history, "growth": _growth(per_history)}
    if len(live_sizes) > 1:
        top = history_sizes[-1]
        small, big = (
            out["live"][live_sizes[0]]["history"][top],
            out["live"][live_sizes[-1]]["history"][top],
        )
        out["live_growth"] = {
            f"{live_sizes[0]}->{live_sizes[-1]} live at history {top}": {
                name: ratio(big[name]["median_ms"], small[name]["median_ms"]) for name in small
            }
        }
    return out


def _growth(per_history: dict[int, Any]) -> dict[str, dict[str, float | None]]:
    sizes = sorted(per_history)
    growth: dict[str, dict[str, float | None]] = {}
    for a, b in itertools.pairwise(sizes):
        growth[f"{a}->{b}"] = {
            name: ratio(per_history[b][name]["median_ms"], per_history[a][name]["median_ms"])
            for name in per_history[a]
        }
    return growth


def sqlite_urls() -> Callable[[], str]:
    base = Path(tempfile.mkdtemp(prefix="wl-bench-scale-"))

    def make() -> str:
        return f"sqlite:///{base / f'scale-{uuid.uuid4().hex[:8]}.db'}"

    return make
