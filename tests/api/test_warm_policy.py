"""Warm policies in the service: schedules raise the floor, adaptive follows demand and
holds its workers for scale_down_delay; the target and why in the admin API and metrics."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from service import listing
from tests.api.helpers import POOL, admin_pool, request_lease
from tests.conftest import ADMIN_TOKEN, Service, admin, pool_config
from tests.support.fakes import ManualClock

MONDAY_7_UTC = datetime(2026, 11, 30, 7, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(MONDAY_7_UTC)


@pytest.fixture
def pools() -> list[dict[str, Any]]:
    business = {"cron": "0 8 * * 1-5", "duration": "10h", "min_ready": 4, "timezone": "UTC"}
    return [
        pool_config(min_ready=1, max_workers=8, schedules=[business], scale_down_delay="10m"),
        pool_config(
            "adaptive",
            min_ready=0,
            max_workers=12,
            warm_policy="adaptive",
            scale_down_delay="10m",
        ),
    ]


def _ready(svc: Service, pool: str) -> int:
    return sum(1 for w in svc.workers("ready") if w.pool == pool)


def test_a_schedule_raises_the_floor_in_its_window_and_trim_waits_the_delay(
    svc: Service,
) -> None:
    svc.warm()
    assert _ready(svc, POOL) == 1
    svc.clock.advance(hours=1, minutes=1)  # Monday 08:01 UTC: the window is open
    svc.warm()
    assert _ready(svc, POOL) == 4
    warm = admin_pool(svc)["warm"]
    assert (warm["target"], warm["schedule"], warm["schedule_min_ready"]) == (4, "0 8 * * 1-5", 4)
    with svc.session() as session:  # what the dashboard's overview shows
        [overview] = [
            p
            for p in listing.pools_overview(session, svc.clock.now(), svc.clock.now())
            if p.pool.name == POOL
        ]
    assert overview.warm is not None and overview.warm.ready == 4
    svc.clock.advance(hours=10)  # 18:01: closed, but within scale_down_delay
    svc.tick()
    assert _ready(svc, POOL) == 4
    svc.clock.advance(minutes=10)
    svc.tick()
    assert _ready(svc, POOL) == 1


def test_adaptive_pool_grows_with_demand_and_shrinks_after_the_delay(svc: Service) -> None:
    svc.warm()
    assert _ready(svc, "adaptive") == 0  # no history: no idle workers
    tokens = [svc.tenant(f"t{i}")["token"] for i in range(6)]
    for token in tokens:  # six requests in three minutes; a worker takes 30 s to boot
        request_lease(svc.client, token, pool="adaptive")
        svc.tick()
        svc.clock.advance(seconds=30)
        svc.agents_report_ready()
    svc.warm()
    body = svc.client.get("/v1/admin/pools", headers=admin()).get_json()
    warm = next(p for p in body["pools"] if p["name"] == "adaptive")["warm"]
    assert warm["policy"] == "adaptive" and warm["rate_per_min"] > 0
    assert warm["target"] >= 1 and warm["provision_mean_s"] is not None
    assert _ready(svc, "adaptive") == warm["target"]
    metrics = svc.client.get("/metrics").get_data(as_text=True)
    assert f'workerlease_pool_warm_target{{pool="adaptive"}} {float(warm["target"])}' in metrics
    assert 'workerlease_pool_lease_rate_per_minute{pool="adaptive"}' in metrics

    svc.clock.advance(minutes=5)  # the rate decays; the delay has not passed
    svc.tick()
    assert _ready(svc, "adaptive") >= warm["target"]
    svc.clock.advance(hours=2)  # long after: nothing in the window, no idle workers
    svc.tick()
    assert _ready(svc, "adaptive") == 0


def test_the_dashboard_shows_the_target_and_why(svc: Service) -> None:
    svc.clock.advance(hours=1, minutes=1)  # Monday 08:01 UTC: the window is open
    svc.warm()
    login = svc.client.get("/admin/login")
    csrf = login.get_data(as_text=True).split('name="csrf_token" value="')[1].split('"')[0]
    signed_in = svc.client.post("/admin/login", data={"token": ADMIN_TOKEN, "csrf_token": csrf})
    assert signed_in.status_code in (302, 303), signed_in.get_data(as_text=True)
    overview = svc.client.get("/admin/").get_data(as_text=True)
    assert "fixed: target 4" in overview
    page = svc.client.get(f"/admin/pools/{POOL}").get_data(as_text=True)
    assert "raises the floor to 4" in page
