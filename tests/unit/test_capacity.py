"""The warm target: estimators, the Poisson base stock, schedules, and the policies."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from service.capacity import (
    ADAPTIVE,
    FAST_NOISE_SD,
    FIXED,
    History,
    Schedule,
    WarmPolicy,
    base_stock,
    cron_trigger,
    demand_rate,
    ewma_rate,
    keep_falls_below,
    peak_demand_rate,
    peak_rate,
    provision_time,
    ready_target,
    schedule_floor,
    warm_target,
)

TUESDAY_9_UTC = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def test_ewma_rate_of_a_steady_stream_is_its_rate() -> None:
    every_6_s = [i * 6.0 for i in range(2000)]  # 10 per minute, for longer than the window
    assert ewma_rate(every_6_s) * 60 == pytest.approx(10, rel=0.02)


def test_ewma_rate_forgets_old_requests() -> None:
    assert ewma_rate([]) == 0
    assert ewma_rate([10_000.0]) == 0  # beyond the history window
    assert ewma_rate([1200.0]) < ewma_rate([0.0]) / 3.9  # two half-lives: a quarter


def test_the_demand_rate_rises_within_minutes_and_falls_over_ten() -> None:
    quiet_then_busy = [i * 6.0 for i in range(30)] + [3000.0 + i * 60 for i in range(10)]
    assert demand_rate(quiet_then_busy) * 60 > 2.5 * ewma_rate(quiet_then_busy) * 60
    busy_then_quiet = [600.0 + i * 6 for i in range(30)]  # a burst that ended 10 min ago
    assert demand_rate(busy_then_quiet) == ewma_rate(busy_then_quiet)


def test_the_fast_rate_counts_only_beyond_its_noise() -> None:
    # A steady stream of 1 a minute with two more requests in its last minute: the fast
    # rate alone reads 1.5/min there, but that is within one of its standard deviations
    # (+-0.45/min at the slow rate's 1.1/min), so the estimate stays the slow rate.
    steady = [60.0 + i * 60 for i in range(40)]
    cluster = [5.0, 20.0, *steady]
    assert ewma_rate(cluster, 120.0) > 1.3 * ewma_rate(cluster)
    assert demand_rate(cluster) == ewma_rate(cluster)
    # A step from 1 a minute to 10 a minute over the last 3 minutes is well beyond it:
    # the estimate is the fast rate less its noise, twice the slow rate.
    step = [i * 6.0 for i in range(30)] + [180.0 + i * 60 for i in range(40)]
    fast, slow = ewma_rate(step, 120.0), ewma_rate(step)
    noise = math.sqrt(slow * math.log(2) / 120.0 / 2)
    assert demand_rate(step) == pytest.approx(fast - FAST_NOISE_SD * noise)
    assert demand_rate(step) > 2 * slow


def test_the_demand_rate_in_one_loop_is_the_two_rates_to_the_bit() -> None:
    """``demand_rate`` sums both rates in one loop over the ages: to the bit what two
    ``ewma_rate`` calls give (a replay's figures must not move with the speed-up)."""
    rng = random.Random(3)
    for _ in range(300):
        count = rng.randint(0, 90)
        ages = [rng.uniform(-60, 4000) * rng.choice([1.0, 0.1]) for _ in range(count)]
        half_life = rng.choice([600.0, 300.0, 1800.0])
        fast_half_life = half_life / 5
        slow, fast = ewma_rate(ages, half_life), ewma_rate(ages, fast_half_life)
        noise = math.sqrt(slow * math.log(2) / fast_half_life / 2)
        assert demand_rate(ages, half_life) == max(slow, fast - FAST_NOISE_SD * noise)


def test_peak_rate_holds_the_burst_that_just_ended() -> None:
    burst_an_hour_ago = [1800.0 + i for i in range(30)]  # 30 requests, 30 min ago
    assert peak_rate(burst_an_hour_ago, within_s=3600) > 3 * ewma_rate(burst_an_hour_ago)
    assert peak_rate(burst_an_hour_ago, within_s=60) == ewma_rate(burst_an_hour_ago)


def test_provision_time_is_the_mean_or_the_os_default() -> None:
    # The M/G/inf count in flight is Poisson with rate x *mean* time: a long tail
    # (one 900 s boot among 40 s ones) moves the mean, not a high percentile's margin.
    assert provision_time(list(range(1, 101)), "ubuntu") == 50.5
    assert provision_time([40.0] * 9 + [900.0], "windows") == 126
    assert provision_time([], "windows") == 600
    assert provision_time([], "ubuntu") == 60


@pytest.mark.parametrize(
    ("mean", "target", "stock"),
    [
        (0.0, 0.95, 0),  # no demand, no idle workers
        (0.01, 0.95, 1),  # P(N = 0) = 0.99
        (0.55, 0.95, 3),  # P(N <= 1) = 0.894, P(N <= 2) = 0.982
        (10.0, 0.95, 16),  # P(N <= 14) = 0.917, P(N <= 15) = 0.951
    ],
)
def test_base_stock_is_the_poisson_quantile(mean: float, target: float, stock: int) -> None:
    assert base_stock(mean, target, ceiling=100) == stock
    cdf = sum(math.exp(-mean) * mean**k / math.factorial(k) for k in range(stock))
    assert stock == 0 or cdf >= target


def test_base_stock_stops_at_the_ceiling() -> None:
    assert base_stock(50.0, 0.95, ceiling=8) == 8


def test_numeric_weekdays_mean_what_crontab_means() -> None:
    # APScheduler 3 alone reads "1-5" as Tuesday-Saturday.
    trigger = cron_trigger("0 8 * * 1-5", "UTC")
    saturday = datetime(2026, 12, 5, 0, 0, tzinfo=UTC)
    assert trigger.get_next_fire_time(None, saturday) == datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
    assert "sun" in str(cron_trigger("0 8 * * 0", "UTC"))
    assert "sun" in str(cron_trigger("0 8 * * 7", "UTC"))


def test_bad_cron_or_zone_is_refused() -> None:
    with pytest.raises(ValueError):
        cron_trigger("0 8 * *", "UTC")
    with pytest.raises(ValueError):
        cron_trigger("0 8 * * 9", "UTC")
    with pytest.raises(KeyError):
        cron_trigger("0 8 * * 1-5", "Mars/Olympus")


def test_schedule_window_follows_its_time_zone() -> None:
    paris = Schedule("0 8 * * 1-5", duration_s=10 * 3600, min_ready=6, timezone="Europe/Paris")
    at = TUESDAY_9_UTC.replace(hour=6, minute=30)  # 07:30 in Paris: before the window
    assert schedule_floor([paris], at) == (0, None)
    assert schedule_floor([paris], at.replace(hour=7, minute=5)) == (6, "0 8 * * 1-5")
    assert schedule_floor([paris], at.replace(hour=16, minute=55)) == (6, "0 8 * * 1-5")
    assert schedule_floor([paris], at.replace(hour=17, minute=5)) == (0, None)  # 18:05 Paris
    saturday = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
    assert schedule_floor([paris], saturday) == (0, None)


def _policy(**overrides: object) -> WarmPolicy:
    values: dict[str, object] = {"policy": FIXED, "min_ready": 2, "max_workers": 20}
    values.update(overrides)
    return WarmPolicy(**values)  # type: ignore[arg-type]


def test_fixed_policy_is_min_ready_raised_by_a_schedule() -> None:
    assert warm_target(_policy(), History(), TUESDAY_9_UTC).ready == 2
    business = Schedule("0 8 * * 1-5", duration_s=10 * 3600, min_ready=6)
    target = warm_target(_policy(schedules=(business,)), History(), TUESDAY_9_UTC)
    assert (target.ready, target.schedule_min_ready) == (6, 6)
    assert "raises the floor to 6" in target.reason


def test_a_schedule_floor_is_held_for_the_scale_down_delay_after_its_window() -> None:
    business = Schedule("0 8 * * 1-5", duration_s=10 * 3600, min_ready=6)
    policy = _policy(schedules=(business,), scale_down_delay_s=600)
    just_after = TUESDAY_9_UTC.replace(hour=18, minute=5)
    target = warm_target(policy, History(), just_after)
    assert (target.ready, target.keep) == (2, 6)
    later = warm_target(policy, History(), just_after + timedelta(minutes=10))
    assert later.keep == 2


def test_adaptive_target_follows_rate_times_provisioning_time() -> None:
    steady = History(request_ages_s=[i * 6.0 for i in range(2000)], provision_s=[40.0] * 20)
    target = warm_target(_policy(policy=ADAPTIVE, min_ready=0), steady, TUESDAY_9_UTC)
    # 10/min x 40 s: Poisson(6.67), the 95% base stock is 11.
    assert target.rate_per_min == pytest.approx(10, rel=0.03)
    assert target.provision_mean_s == 40
    assert target.ready == base_stock(10 / 60 * 40, 0.95, 20) == target.demand_ready


def test_adaptive_target_is_floored_and_capped() -> None:
    quiet = warm_target(_policy(policy=ADAPTIVE, min_ready=1), History(), TUESDAY_9_UTC)
    assert (quiet.ready, quiet.demand_ready) == (1, 0)
    busy = History(request_ages_s=[i * 0.5 for i in range(5000)], provision_s=[600.0])
    capped = warm_target(_policy(policy=ADAPTIVE, max_workers=5), busy, TUESDAY_9_UTC)
    assert capped.ready == capped.keep == 5


def test_ready_target_alone_is_the_full_targets_ready() -> None:
    """Refill asks ``ready_target``; trim and the admin view ``warm_target``: one answer."""
    rng = random.Random(5)
    business = Schedule("0 8 * * 1-5", duration_s=10 * 3600, min_ready=6)
    for _ in range(300):
        policy = _policy(
            policy=rng.choice([FIXED, ADAPTIVE]),
            min_ready=rng.randint(0, 3),
            max_workers=rng.randint(1, 30),
            schedules=rng.choice([(), (business,)]),
            os=rng.choice(["ubuntu", "windows"]),
        )
        ages = sorted(rng.uniform(0, 3600) for _ in range(rng.randint(0, 200)))
        history = History(ages, [rng.uniform(20, 900) for _ in range(rng.randint(0, 50))])
        now = TUESDAY_9_UTC + timedelta(hours=rng.uniform(-12, 12))
        assert ready_target(policy, history, now) == warm_target(policy, history, now).ready


def test_adaptive_keeps_the_burst_target_until_the_scale_down_delay() -> None:
    burst_5_min_ago = History(request_ages_s=[300.0 + i for i in range(40)], provision_s=[60.0])
    policy = _policy(policy=ADAPTIVE, min_ready=0, scale_down_delay_s=600)
    target = warm_target(policy, burst_5_min_ago, TUESDAY_9_UTC)
    assert target.keep > target.ready
    short_delay = warm_target(
        _policy(policy=ADAPTIVE, min_ready=0, scale_down_delay_s=60),
        burst_5_min_ago,
        TUESDAY_9_UTC,
    )
    assert short_delay.keep == short_delay.ready


def test_trim_holds_the_peak_of_the_demand_estimate_over_the_delay() -> None:
    # 40 requests in 40 s, 5 minutes ago: a step the fast rate shows beyond its noise.
    # Trim keeps what the estimate asked for at its peak (at the burst's last request),
    # more than the slow rate's own peak asks for, and lets go once the delay has passed.
    ages = [300.0 + i for i in range(40)]
    history = History(request_ages_s=ages, provision_s=[60.0])
    policy = _policy(policy=ADAPTIVE, min_ready=0, scale_down_delay_s=600)
    target = warm_target(policy, history, TUESDAY_9_UTC)
    at_the_peak = demand_rate([age - 300.0 for age in ages])
    assert peak_demand_rate(ages, 600) == pytest.approx(at_the_peak, rel=0.01)
    assert target.keep == base_stock(at_the_peak * 60, 0.95, 20)
    assert target.keep > base_stock(peak_rate(ages, 600) * 60, 0.95, 20) > target.ready
    later = History(request_ages_s=[age + 600 for age in ages], provision_s=[60.0])
    assert warm_target(policy, later, TUESDAY_9_UTC).keep < target.keep


def test_noise_of_the_fast_rate_is_not_held() -> None:
    # An hour of Poisson requests at 1 a minute: the fast rate's peaks over the last
    # 10 minutes are noise (1.8/min here), and what trim holds stays at the slow rate's.
    rng, t, ages = random.Random(1), 0.0, []
    while t < 3600:
        t += rng.expovariate(1 / 60)
        ages.append(t)
    assert peak_rate(ages, 600, 120.0) > 1.3 * peak_rate(ages, 600)
    assert peak_demand_rate(ages, 600) < 1.1 * peak_rate(ages, 600)


def test_keep_falls_below_skips_the_search_when_a_planned_pass_comes_first() -> None:
    # The burst above: what trim keeps falls once the delay has passed. A caller whose
    # pass is planned before that gets None (its pass asks again); one planned after it
    # gets the bisection's own answer, unchanged.
    ages = [300.0 + i for i in range(40)]
    history = History(request_ages_s=ages, provision_s=[60.0])
    policy = _policy(policy=ADAPTIVE, min_ready=0, scale_down_delay_s=600)
    now = TUESDAY_9_UTC
    count = warm_target(policy, history, now).keep
    until = now + timedelta(seconds=policy.history_s + 1)
    falls = keep_falls_below(policy, history, now, count, until)
    assert falls is not None and now < falls < until
    kept = History([age + (falls - now).total_seconds() for age in ages], [60.0])
    assert warm_target(policy, kept, falls).keep >= count  # at most a second before it
    before = falls - timedelta(seconds=30)
    assert keep_falls_below(policy, history, now, count, until, planned=before) is None
    after = falls + timedelta(seconds=30)
    assert keep_falls_below(policy, history, now, count, until, planned=after) == falls
