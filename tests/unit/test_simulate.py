"""``workerlease simulate``: traces, the generator, and replays of the real service code."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from sqlmodel import SQLModel

from service.cli import main
from service.config import Config, config_from_dict
from service.models import LISTING_INDEXES
from service.simulate import (
    DEFAULT_START,
    Replay,
    SimulationError,
    TraceRow,
    compare,
    generate,
    read_trace,
    simulate,
    with_policy,
    write_trace,
)


def _config(**pool: Any) -> dict[str, Any]:
    entry = {"name": "ubuntu", "os": "ubuntu", "min_ready": 0, "max_workers": 10}
    entry.update(pool)
    return {"pools": [entry]}


def test_generated_traces_are_deterministic_and_round_trip(tmp_path: Path) -> None:
    rows = generate("bursty", seed=3, pool="ubuntu", rate_per_min=2, hours=2)
    assert rows == generate("bursty", seed=3, pool="ubuntu", rate_per_min=2, hours=2)
    assert rows != generate("bursty", seed=4, pool="ubuntu", rate_per_min=2, hours=2)
    write_trace(rows, tmp_path / "t.csv")
    assert read_trace(tmp_path / "t.csv") == rows


def test_business_day_is_busy_in_office_hours_only() -> None:
    rows = generate("business-day", seed=1, pool="ubuntu", rate_per_min=2, hours=24)
    office = [r for r in rows if 9 * 3600 <= r.time < 18 * 3600]
    night = [r for r in rows if r.time < 8 * 3600]
    assert len(office) > 10 * len(night) > 0


def test_a_bad_trace_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("time,tenant,pool,hold_seconds\n1,a,ubuntu,10\nsoon,b,ubuntu,10\n")
    with pytest.raises(SimulationError, match=r"t\.csv:3"):
        read_trace(path)
    path.write_text("when,who\n")
    with pytest.raises(SimulationError, match="header"):
        read_trace(path)


def test_policies_override_every_pool() -> None:
    config = config_from_dict(_config(max_workers=4))
    assert with_policy(config, "fixed:9").pools[0].min_ready == 4  # capped by max_workers
    assert with_policy(config, "adaptive").pools[0].warm_policy == "adaptive"
    with pytest.raises(SimulationError):
        with_policy(config, "fixed:many")


def test_a_warm_pool_serves_spaced_leases_at_once_and_replays_deterministically() -> None:
    fixed_30_s = {"provision_seconds": {"median": 30, "p95": 30}}
    config = config_from_dict(_config(min_ready=2, cost_per_hour=0.6, simulation=fixed_30_s))
    trace = [TraceRow(60.0 * i, f"t{i}", "ubuntu", 120.0) for i in range(20)]
    first = simulate(config, trace, seed=5)
    pool = first.pools["ubuntu"]
    assert pool.leases == pool.served == 20
    assert pool.warm_hit_rate == 1.0 and pool.wait_max_s == 0
    # Every lease used a worker of its own (never reused), each replaced once taken.
    assert pool.creations == 20
    assert pool.idle_worker_minutes > 0 and pool.worker_minutes > pool.idle_worker_minutes
    assert pool.cost == pytest.approx(pool.worker_minutes / 60 * 0.6, abs=0.01)
    assert simulate(config, trace, seed=5).as_dict() == first.as_dict()


def test_a_cold_pool_makes_every_lease_wait_for_provisioning() -> None:
    config = config_from_dict(
        _config(simulation={"provision_seconds": {"median": 100, "p95": 100}})
    )
    trace = [TraceRow(600.0 * i, f"t{i}", "ubuntu", 60.0) for i in range(5)]
    pool = simulate(config, trace, policy="fixed:0").pools["ubuntu"]
    assert pool.warm_hit_rate == 0
    assert pool.wait_p50_s == pytest.approx(100, abs=1)  # the ring starts the create at once
    assert pool.idle_worker_minutes == 0


def test_create_failures_back_off_and_the_leases_are_still_served() -> None:
    config = config_from_dict(_config(min_ready=1, simulation={"failure_rate": 0.5}))
    trace = [TraceRow(120.0 * i, f"t{i}", "ubuntu", 60.0) for i in range(10)]
    pool = simulate(config, trace, seed=2).pools["ubuntu"]
    assert pool.served == 10
    assert pool.creations > 11  # failed creates are workers too (failed, destroyed)


def test_cli_generates_and_simulates_with_json(tmp_path: Path) -> None:
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(_config(min_ready=1)))
    trace = tmp_path / "t.csv"
    runner = CliRunner()
    made = runner.invoke(
        main,
        [
            "simulate",
            "generate",
            "--shape",
            "steady",
            "--seed",
            "1",
            "--pool",
            "ubuntu",
            "--rate",
            "2",
            "--hours",
            "0.5",
            "--out",
            str(trace),
        ],
    )
    assert made.exit_code == 0, made.output
    ran = runner.invoke(
        main, ["simulate", "--config", str(config_path), "--trace", str(trace), "--json"]
    )
    assert ran.exit_code == 0, ran.output
    result = json.loads(ran.output)["pools"]["ubuntu"]
    for key in (
        "wait_p50_s",
        "wait_p95_s",
        "wait_p99_s",
        "wait_max_s",
        "warm_hit_rate",
        "idle_worker_minutes",
        "worker_minutes",
        "creations",
        "cost",
    ):
        assert key in result
    unknown = runner.invoke(
        main, ["simulate", "--config", str(config_path), "--trace", str(trace), "--policy", "x"]
    )
    assert unknown.exit_code != 0 and "unknown policy" in unknown.output


def test_compare_finds_the_smallest_fixed_min_ready_with_the_best_p95() -> None:
    config = config_from_dict(
        _config(max_workers=4, simulation={"provision_seconds": {"median": 60, "p95": 60}})
    )
    # Pairs of requests 10 s apart every 10 minutes: two ready workers serve both at once.
    trace = [
        TraceRow(600.0 * i + gap, f"t{i}-{gap}", "ubuntu", 30.0)
        for i in range(6)
        for gap in (0.0, 10.0)
    ]
    result = compare(config, trace, "ubuntu")
    assert result.best_fixed == 2
    assert result.best.wait_p95_s == 0
    assert result.tried[1].wait_p95_s > 0
    assert set(result.tried) <= {0, 1, 2, 3, 4}


def _eventful_hour() -> tuple[Config, list[TraceRow]]:
    """A bursty hour of an adaptive pool whose leases expire and whose creates fail (and
    back off): most of what a replay runs."""
    config = config_from_dict(
        {
            "scheduler": {"interval": "30s"},
            "pools": [
                {
                    "name": "ubuntu",
                    "os": "ubuntu",
                    "min_ready": 0,
                    "max_workers": 200,
                    "warm_policy": "adaptive",
                    "scale_down_delay": "2m",
                    "demand_half_life": "1m",
                    "lease_idle_timeout": "5m",  # some holds outlast it: leases expire
                    "simulation": {"failure_rate": 0.05},  # and creates fail: backoffs
                }
            ],
        }
    )
    trace = generate("bursty", seed=7, pool="ubuntu", rate_per_min=1, hours=1, hold_median_s=120)
    return config, trace


def test_skipping_idle_passes_gives_the_figures_of_a_pass_every_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The replay runs the full pass only when ``due.next_due`` says time gave it work; a
    replay that runs it at every interval instead (as the service does) must agree.

    ``max_workers`` does not bind here: destroys are batched every minute either way
    (their time is not counted), which moves figures only when a freed slot is needed."""
    config, trace = _eventful_hour()
    skipping = simulate(config, trace, policy="adaptive", seed=3)

    def every_interval(session: Any, now: datetime, runs_at: Any = None) -> datetime:
        return now  # always due: a tick runs the pass, and the next comes an interval on

    monkeypatch.setattr("service.simulate.next_due", every_interval)
    monkeypatch.setattr(
        "service.simulate.next_trim_due", lambda s, pool, policy, now, planned=None: None
    )
    every = simulate(config, trace, policy="adaptive", seed=3)
    assert every.passes > skipping.passes
    assert every.pools == skipping.pools
    assert every.pools["ubuntu"].creations > every.pools["ubuntu"].leases // 2  # it did work


def test_the_replays_database_goes_without_the_listing_indexes_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What only the HTTP listings read is dropped (``models.LISTING_INDEXES``): every
    unique index, which holds an invariant, stays, and the figures are the full
    schema's."""
    indexes = {
        index.name: index for table in SQLModel.metadata.tables.values() for index in table.indexes
    }
    assert all(name in indexes and not indexes[name].unique for name in LISTING_INDEXES)
    config, trace = _eventful_hour()
    replay = Replay(with_policy(config, "adaptive"), trace, 3, DEFAULT_START)
    try:
        with replay.engine.connect() as connection:
            present = set(
                connection.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'index'")
                .scalars()
                .all()
            )
    finally:
        replay.close()
    assert not present & set(LISTING_INDEXES)
    assert {name for name, index in indexes.items() if index.unique} <= present
    without = simulate(config, trace, policy="adaptive", seed=3)
    monkeypatch.setattr("service.simulate.LISTING_INDEXES", ())
    assert simulate(config, trace, policy="adaptive", seed=3).pools == without.pools
