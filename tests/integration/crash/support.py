"""Helpers of the crash suite: mode, counters, and reading the truth from the database and /proc.

Quick mode is the default (``make test``); ``WORKERLEASE_CRASH_FULL=1`` runs the
full suite (>= 50 SIGKILL runs, several thousand lease/release cycles).
``WORKERLEASE_CRASH_SEED`` fixes the random seed of the kill runs.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.support.server import local_processes

FULL = os.environ.get("WORKERLEASE_CRASH_FULL", "") not in ("", "0")
LIVE_WORKER_STATES = ("provisioning", "ready", "leased")


@dataclass
class CrashStats:
    runs: int = 0
    kills: int = 0
    leaked: int = 0
    lost: int = 0
    double_leased: int = 0
    used: bool = False
    seeds: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self) -> str:
        return (
            f"crash suite: runs={self.runs} kills={self.kills} leaked={self.leaked} "
            f"lost={self.lost} double_leased={self.double_leased}"
        )

    def as_dict(self) -> dict[str, Any]:
        """What a pytest-xdist process sends its controller (``tests/conftest.py``)."""
        return {name: getattr(self, name) for name in _COUNTERS} | {
            "seeds": sorted(self.seeds),
            "notes": list(self.notes),
        }

    def merge(self, sent: dict[str, Any]) -> None:
        """Add what another process counted (``as_dict``)."""
        with self.lock:
            for name in _COUNTERS:
                setattr(self, name, getattr(self, name) + sent[name])
            self.used = True
            self.seeds.update(sent["seeds"])
            self.notes.extend(sent["notes"])


_COUNTERS = ("runs", "kills", "leaked", "lost", "double_leased")


STATS = CrashStats()


# ---- the database, read directly ---------------------------------------------------


_LEASE_KEYS = (
    "id",
    "tenant_id",
    "pool",
    "state",
    "worker_id",
    "created_at",
    "activated_at",
    "ended_at",
    "end_reason",
)
_LEASES = f"SELECT {', '.join(_LEASE_KEYS)} FROM leases"
_LIVE_WORKERS = "SELECT id, state FROM workers WHERE state <> 'destroyed'"


class Db:
    """Plain SQL against the service's database (sqlite3 or psycopg), no service code."""

    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.snapshot([(sql, params)])[0]

    def snapshot(self, queries: list[tuple[str, tuple[Any, ...]]]) -> list[list[tuple[Any, ...]]]:
        """The queries' rows, all as of one moment: the service keeps running while a
        verdict reads (a lease expiring between a read of the leases and one of the
        workers would look like an active lease on a destroying worker)."""
        if self.url.startswith("sqlite"):
            path = self.url.removeprefix("sqlite:///")
            # Autocommit, then an explicit BEGIN: sqlite3 would not open a transaction
            # for SELECTs, and WAL readers see one snapshot from a transaction's first read.
            connection = sqlite3.connect(path, timeout=30, isolation_level=None)
            try:
                connection.execute("BEGIN")
                rows = [connection.execute(q.replace("%s", "?"), p).fetchall() for q, p in queries]
                connection.execute("COMMIT")
                return rows
            finally:
                connection.close()
        import psycopg

        dsn = self.url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, connect_timeout=10) as connection:
            connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            return [connection.execute(q, p).fetchall() for q, p in queries]  # type: ignore[arg-type]

    def workers(self) -> dict[str, str]:
        """Every worker not destroyed: id -> state."""
        return self.leases_and_workers()[1]

    def leases(self) -> dict[str, dict[str, Any]]:
        return self.leases_and_workers()[0]

    def leases_and_workers(self) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Every lease (id -> row) and every worker not destroyed (id -> state), read
        together."""
        leases, workers = self.snapshot([(_LEASES, ()), (_LIVE_WORKERS, ())])
        return (
            {str(r[0]): dict(zip(_LEASE_KEYS, r, strict=True)) for r in leases},
            {str(i): str(state) for i, state in workers},
        )

    def doubly_leased_workers(self) -> list[tuple[Any, ...]]:
        """Workers in more than one lease (ever), or moved to ``leased`` more than once."""
        in_leases = self.query(
            "SELECT worker_id, count(*) FROM leases WHERE worker_id IS NOT NULL "
            "GROUP BY worker_id HAVING count(*) > 1"
        )
        in_events = self.query(
            "SELECT subject_id, count(*) FROM events WHERE kind = 'worker' "
            "AND to_state = 'leased' GROUP BY subject_id HAVING count(*) > 1"
        )
        return list(in_leases) + list(in_events)

    def tenants_with_two_live(self) -> list[tuple[Any, ...]]:
        return self.query(
            "SELECT tenant_id, pool, count(*) FROM leases WHERE state IN ('pending', 'active') "
            "GROUP BY tenant_id, pool HAVING count(*) > 1"
        )


# ---- /proc against the database ------------------------------------------------------


@dataclass
class Snapshot:
    rows: dict[str, str]  # worker id -> state, not destroyed
    agents: dict[int, str]  # pid -> worker id (live agent processes of the deployment)

    @property
    def live(self) -> set[str]:
        return {w for w, s in self.rows.items() if s in LIVE_WORKER_STATES}

    @property
    def agent_ids(self) -> set[str]:
        return set(self.agents.values())

    @property
    def duplicate_agents(self) -> int:
        return len(self.agents) - len(self.agent_ids)

    @property
    def in_progress(self) -> set[str]:
        """Workers the service is still working on (no final answer expected yet)."""
        return {w for w, s in self.rows.items() if s in ("destroying", "failed")}

    def mismatch(self) -> tuple[set[str], set[str]]:
        """(agents the database does not hold live, live rows without an agent)."""
        return self.agent_ids - self.live, self.live - self.agent_ids

    def equal(self) -> bool:
        extra, missing = self.mismatch()
        return not extra and not missing and not self.duplicate_agents

    def describe(self) -> str:
        extra, missing = self.mismatch()
        return (
            f"agents without a live row={sorted(extra)} live rows without an agent="
            f"{sorted(missing)} duplicate agents={self.duplicate_agents} "
            f"rows={self.rows}"
        )


def snapshot(
    db: Db, deployment_id: str, reap: Callable[[set[int]], None] | None = None
) -> Snapshot | None:
    """Database, /proc, database again: None when the database moved meanwhile."""
    before = db.workers()
    agents = local_processes(deployment_id)
    if reap is not None:
        reap(set(agents))
    after = db.workers()
    if before != after:
        return None
    return Snapshot(after, agents)


def settle(
    db: Db,
    deployment_id: str,
    timeout_s: float,
    quiet: Callable[[Snapshot], bool] = lambda _s: True,
    reap: Callable[[set[int]], None] | None = None,
    interval_s: float = 0.5,
    min_s: float = 0.0,
    streak_of: int = 3,
) -> tuple[Snapshot | None, float]:
    """Poll until consistent snapshots show agents equal to live rows ``streak_of`` times
    in a row (and ``quiet``), no sooner than ``min_s``.

    Returns the last snapshot (settled or not) and the seconds it took.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    last: Snapshot | None = None
    streak = 0
    while True:
        snap = snapshot(db, deployment_id, reap)
        if snap is not None:
            last = snap
            if snap.equal() and quiet(snap):
                streak += 1
                if streak >= streak_of and time.monotonic() - started >= min_s:
                    return snap, time.monotonic() - started
            else:
                streak = 0
        if time.monotonic() >= deadline:
            return last, time.monotonic() - started
        time.sleep(interval_s)
