"""How many ready workers a pool should keep: its warm policy, computed from its history.

Pure functions of what the database remembers (lease request times, provisioning
times) and of the clock; ``service.pools`` reads the history and applies the
answer. Nothing is stored: the target is recomputed from the same history each pass.

- ``fixed``: keep ``min_ready`` ready (raised by any active schedule window).
- ``adaptive``: keep enough ready that a lease finds one with probability
  ``warm_hit_target`` while the replacements are on their way. Workers on order are
  an M/G/inf queue, so with S ready-or-provisioning workers and arrivals at rate
  ``lam`` an arriving lease is served warm iff fewer than S replacements are still
  provisioning: P(N <= S - 1) with N ~ Poisson(lam * T), T the mean of recent
  provisioning times (the count in flight of an M/G/inf queue is Poisson with mean
  rate x *mean* service time, whatever the distribution's tail). ``lam`` is an
  exponentially weighted rate of recent lease requests (half-life 10 minutes), or a
  2-minute one where that stands beyond its noise above it (a step in demand).
  Floor ``min_ready`` (and the schedules), ceiling ``max_workers``.
- Surplus is trimmed only after ``scale_down_delay``: trim keeps the highest target
  of that window (the rates peak right after an arrival; a schedule's floor is held
  for the delay after its window ends), so a lull does not throw away workers that
  took minutes to boot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger

FIXED = "fixed"
ADAPTIVE = "adaptive"
# The arrival rate forgets with this half-life by default (a pool's ``demand_half_life``);
# the history read is HISTORY_HALF_LIVES of them (beyond, a request weighs under 1/16
# and is left out).
RATE_HALF_LIFE_S = 600.0
# The demand estimate is the larger of that rate and one with this short half-life, so
# it rises within minutes and falls over ten. Measured (simulate, business-day trace,
# Windows-like 8 min boots): the 10-minute rate alone lagged the morning ramp, 89.6 %
# warm and p95 wait 48 s; with a 2-minute one beside it 97.8 % and 0 s (5-minute: 92.8 %,
# 32 s). Ubuntu-like (40 s boots): 98.6 % -> 99.0 % warm, idle minutes +11 %.
FAST_HALF_LIFE_S = 120.0
FAST_FACTOR = RATE_HALF_LIFE_S / FAST_HALF_LIFE_S  # a pool's fast rate: its half-life / 5
HISTORY_HALF_LIVES = 4
FAST_NOISE_SD = 1.0  # the fast rate counts beyond this many of its standard deviations
PROVISION_SAMPLES = 50  # the most recent provisioning times the mean is taken of
# Until a pool has provisioned a worker, how long one is assumed to take (by os).
DEFAULT_PROVISION_S = {"windows": 600.0, "ubuntu": 60.0, "linux": 60.0}


@dataclass(frozen=True)
class Schedule:
    """A cron window that raises the floor: from each fire time, for ``duration_s``."""

    cron: str
    duration_s: int
    min_ready: int
    timezone: str = "UTC"


@dataclass(frozen=True)
class WarmPolicy:
    policy: str
    min_ready: int
    max_workers: int
    hit_target: float = 0.95
    scale_down_delay_s: int = 600
    schedules: tuple[Schedule, ...] = ()
    os: str = "ubuntu"
    demand_half_life_s: float = RATE_HALF_LIFE_S

    @property
    def reads_history(self) -> bool:
        return self.policy == ADAPTIVE

    @property
    def history_s(self) -> float:
        """How far back the target reads requests: the estimate's window, and the
        scale-down delay over which trim keeps its peak."""
        return history_window_s(self.demand_half_life_s) + self.scale_down_delay_s


@dataclass(frozen=True)
class History:
    """What the database remembers: seconds since each recent lease request (any
    order), and recent provisioning times (created -> ready) in seconds."""

    request_ages_s: Sequence[float] = ()
    provision_s: Sequence[float] = ()


@dataclass(frozen=True)
class Target:
    """The ready target (refill up to it), what trim keeps, and why."""

    ready: int
    keep: int
    policy: str
    min_ready: int
    schedule_min_ready: int = 0
    schedule: str | None = None  # the cron of the window that sets the floor, if any
    rate_per_min: float | None = None
    provision_mean_s: float | None = None
    demand_ready: int | None = None  # what the Poisson quantile asks for

    @property
    def reason(self) -> str:
        parts = [f"min_ready {self.min_ready}"]
        if self.schedule is not None:
            parts.append(
                f"schedule {self.schedule!r} raises the floor to {self.schedule_min_ready}"
            )
        if self.demand_ready is not None:
            parts.append(
                f"demand {self.rate_per_min:.2f}/min x mean provisioning "
                f"{self.provision_mean_s:.0f} s asks for {self.demand_ready}"
            )
        if self.keep > self.ready:
            parts.append(f"keeping {self.keep} until the scale-down delay passes")
        return "; ".join(parts)


def warm_target(policy: WarmPolicy, history: History, now: datetime) -> Target:
    floor, schedule = schedule_floor(policy.schedules, now)
    held_floor, _ = schedule_floor(
        policy.schedules, now - timedelta(seconds=policy.scale_down_delay_s)
    )
    base = max(policy.min_ready, floor)
    if not policy.reads_history:
        ready = min(base, policy.max_workers)
        keep = min(max(base, held_floor), policy.max_workers)
        return Target(ready, max(ready, keep), policy.policy, policy.min_ready, floor, schedule)
    rate, provision, demand = _demand(policy, history)
    peak = max(
        _peak_at_arrivals(
            history.request_ages_s, policy.scale_down_delay_s, policy.demand_half_life_s
        ),
        rate,
    )  # = peak_demand_rate, without computing ``rate`` twice
    held = base_stock(peak * provision, policy.hit_target, policy.max_workers)
    ready = min(max(base, demand), policy.max_workers)
    keep = min(max(ready, held, held_floor), policy.max_workers)
    return Target(
        ready,
        keep,
        policy.policy,
        policy.min_ready,
        floor,
        schedule,
        rate_per_min=round(rate * 60, 4),
        provision_mean_s=round(provision, 1),
        demand_ready=demand,
    )


def ready_target(policy: WarmPolicy, history: History, now: datetime) -> int:
    """``warm_target(...).ready`` alone, what refill asks: without what trim keeps, whose
    peak over the scale-down delay is most of the target's arithmetic (a replay asks
    refill's question ~2 times a request)."""
    floor, _ = schedule_floor(policy.schedules, now)
    base = max(policy.min_ready, floor)
    if policy.reads_history:
        base = max(base, _demand(policy, history)[2])
    return min(base, policy.max_workers)


def _demand(policy: WarmPolicy, history: History) -> tuple[float, float, int]:
    """The demand rate, the mean provisioning time, and the ready workers they ask for."""
    rate = demand_rate(history.request_ages_s, policy.demand_half_life_s)
    provision = provision_time(history.provision_s, policy.os)
    return rate, provision, base_stock(rate * provision, policy.hit_target, policy.max_workers)


# ---- the estimators ------------------------------------------------------------------


def history_window_s(half_life_s: float = RATE_HALF_LIFE_S) -> float:
    return half_life_s * HISTORY_HALF_LIVES


def ewma_rate(ages_s: Sequence[float], half_life_s: float = RATE_HALF_LIFE_S) -> float:
    """Requests per second, each weighted by 2^(-age / half_life): an unbiased estimate of
    a steady rate (normalised for the part of the kernel beyond the history window)."""
    decay = math.log(2) / half_life_s
    window = half_life_s * HISTORY_HALF_LIVES
    weight = sum(math.exp(-decay * age) for age in ages_s if 0 <= age <= window)
    return weight * decay / (1 - math.exp(-decay * window))


def demand_rate(ages_s: Sequence[float], half_life_s: float = RATE_HALF_LIFE_S) -> float:
    """Requests per second: the slow ``ewma_rate``, or the fast one where it stands more
    than its own noise above it.

    Of a steady Poisson stream at rate r, an exponentially weighted rate with decay d has
    variance r * d / 2: the fast estimate of 1 request a minute is +-42 %, so the larger
    of the two alone rose with every cluster of arrivals of a steady stream and ordered
    workers that trim then threw away. Only the part of the fast rate beyond one standard
    deviation of it (at the slow rate) counts: a step still shows within minutes.
    Measured (simulate, docs/capacity.md): two deviations brought the steady Windows-like
    pool closer to the best fixed one (idle minutes +17 % against +43 % with one), but
    lagged the Monday-to-Friday 08:00 ramps of 8-minute boots: the business week's p95
    wait 30 s, 94.0 % warm; with one, 0 s and 96.1 %.
    """
    fast_half_life = half_life_s / FAST_FACTOR
    slow, fast = _two_ewma_rates(ages_s, half_life_s, fast_half_life)
    return _beyond_noise(slow, fast, fast_half_life)


def _two_ewma_rates(
    ages_s: Sequence[float], half_life_s: float, fast_half_life_s: float
) -> tuple[float, float]:
    """``ewma_rate`` at both half-lives in one loop over the ages (a replay evaluates
    the target ~7,000 times a simulated day); the same sums, term by term, as two calls.
    ``fast_half_life_s`` is the shorter."""
    assert fast_half_life_s <= half_life_s
    slow_decay, fast_decay = math.log(2) / half_life_s, math.log(2) / fast_half_life_s
    slow_window = half_life_s * HISTORY_HALF_LIVES
    fast_window = fast_half_life_s * HISTORY_HALF_LIVES
    exp = math.exp
    slow = fast = 0.0
    for age in ages_s:
        if 0 <= age <= slow_window:
            slow += exp(-slow_decay * age)
            if age <= fast_window:  # within the slow one: its half-life is a fifth
                fast += exp(-fast_decay * age)
    return (
        slow * slow_decay / (1 - exp(-slow_decay * slow_window)),
        fast * fast_decay / (1 - exp(-fast_decay * fast_window)),
    )


def _beyond_noise(slow: float, fast: float, fast_half_life_s: float) -> float:
    noise = math.sqrt(slow * math.log(2) / fast_half_life_s / 2)
    return max(slow, fast - FAST_NOISE_SD * noise)


def peak_demand_rate(
    ages_s: Sequence[float], within_s: float, half_life_s: float = RATE_HALF_LIFE_S
) -> float:
    """The highest ``demand_rate`` over the last ``within_s`` seconds (what trim holds):
    both rates peak at arrivals, so it is read at each arrival of that window, both
    levels carried along in one pass (requests older than a rate's window still count
    there, decayed below 1/16)."""
    return max(_peak_at_arrivals(ages_s, within_s, half_life_s), demand_rate(ages_s, half_life_s))


def _peak_at_arrivals(ages_s: Sequence[float], within_s: float, half_life_s: float) -> float:
    fast_half_life = half_life_s / FAST_FACTOR
    # Two scalars, not lists of both, and ``_beyond_noise`` written out (the same
    # arithmetic, in the same order): a replay evaluates this ~7,000 times a simulated
    # day, most of the target's time.
    slow_decay, fast_decay = math.log(2) / half_life_s, math.log(2) / fast_half_life
    slow_norm = slow_decay / (1 - math.exp(-slow_decay * (half_life_s * HISTORY_HALF_LIVES)))
    fast_norm = fast_decay / (1 - math.exp(-fast_decay * (fast_half_life * HISTORY_HALF_LIVES)))
    exp, sqrt, log2 = math.exp, math.sqrt, math.log(2)
    slow = fast = peak = 0.0
    previous = None
    horizon = half_life_s * HISTORY_HALF_LIVES + within_s
    for age in sorted([a for a in ages_s if 0 <= a <= horizon], reverse=True):
        if previous is not None:
            slow *= exp(-slow_decay * (previous - age))
            fast *= exp(-fast_decay * (previous - age))
        slow += 1.0
        fast += 1.0
        previous = age
        if age <= within_s:
            slow_rate = slow * slow_norm
            beyond = fast * fast_norm - FAST_NOISE_SD * sqrt(slow_rate * log2 / fast_half_life / 2)
            rate = beyond if beyond > slow_rate else slow_rate
            if rate > peak:
                peak = rate
    return peak


def peak_rate(
    ages_s: Sequence[float], within_s: float, half_life_s: float = RATE_HALF_LIFE_S
) -> float:
    """The highest ``ewma_rate`` over the last ``within_s`` seconds: it peaks at arrivals."""
    decay = math.log(2) / half_life_s
    window = half_life_s * HISTORY_HALF_LIVES
    norm = decay / (1 - math.exp(-decay * window))
    level, previous, peak = 0.0, None, 0.0
    for age in sorted((a for a in ages_s if 0 <= a <= window + within_s), reverse=True):
        if previous is not None:
            level *= math.exp(-decay * (previous - age))
        level += 1.0
        previous = age
        if age <= within_s:
            peak = max(peak, level * norm)
    return max(peak, ewma_rate(ages_s, half_life_s))


def provision_time(samples_s: Sequence[float], os: str) -> float:
    """The mean of recent provisioning times, or the os default.

    The mean, not a high percentile: by the M/G/inf result the replacements on their way
    are Poisson with mean rate x mean time. The p90 overstated it (with Windows-like boots,
    median 8 min and p95 15 min, by half), and the target's margin belongs to the hit
    target alone."""
    if not samples_s:
        return DEFAULT_PROVISION_S.get(os, 60.0)
    return math.fsum(samples_s) / len(samples_s)


def base_stock(mean: float, hit_target: float, ceiling: int) -> int:
    """Smallest S with P(Poisson(mean) <= S - 1) >= hit_target; 0 without demand."""
    if mean <= 0:
        return 0
    term = math.exp(-mean)
    cdf = term
    stock = 1
    while cdf < hit_target and stock < ceiling:
        term *= mean / stock
        cdf += term
        stock += 1
    return stock


# ---- schedules -----------------------------------------------------------------------


_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


@lru_cache(maxsize=256)
def cron_trigger(cron: str, timezone: str) -> CronTrigger:
    """APScheduler's own crontab parser; raises ValueError on a bad expression or zone.

    APScheduler 3 reads a numeric day of week as 0 = Monday (its issues #286, #1102:
    fixed only in 4.0), so ``1-5`` would mean Tuesday to Saturday. Numbers are given
    to it as day names, in crontab's meaning (0 and 7 Sunday).
    """
    fields = cron.split()
    if len(fields) != 5:
        raise ValueError(f"a crontab expression has 5 fields, not {len(fields)}: {cron!r}")
    fields[4] = _day_names(fields[4])
    return CronTrigger.from_crontab(" ".join(fields), timezone=ZoneInfo(timezone))


def _day_names(field: str) -> str:
    names: list[str] = []
    for token in field.split(","):
        days, _, step = token.partition("/")
        first, _, last = days.partition("-")
        if not (first.isdigit() or first == "*") or (last and not last.isdigit()):
            names.append(token)  # names, or an error APScheduler reports
            continue
        low = 0 if first == "*" else int(first)
        high = 6 if first == "*" else int(last or first)
        stride = int(step) if step.isdigit() else 1
        if first.isdigit() and not last and step:
            high = 6  # "1/2": from Monday on, every second day
        if not 0 <= low <= high <= 7 or stride < 1:
            raise ValueError(f"day of week {token!r} is out of range 0-7")
        names += [_CRON_DAYS[day] for day in range(low, high + 1, stride)]
    return ",".join(dict.fromkeys(names))


def schedule_floor(schedules: Sequence[Schedule], now: datetime) -> tuple[int, str | None]:
    """The highest ``min_ready`` of the windows open at ``now``, and that window's cron."""
    best, which = 0, None
    for schedule in schedules:
        if schedule.min_ready <= best or not window_open(schedule, now):
            continue
        best, which = schedule.min_ready, schedule.cron
    return best, which


def window_open(schedule: Schedule, now: datetime) -> bool:
    """True when a fire time lies in (now - duration, now]."""
    trigger = cron_trigger(schedule.cron, schedule.timezone)
    since = now - timedelta(seconds=schedule.duration_s) + timedelta(microseconds=1)
    fire = trigger.get_next_fire_time(None, since)
    return fire is not None and fire <= now


# ---- when time alone changes the target ----------------------------------------------
# A replay (``workerlease simulate``) runs the full pass only when one of these is due,
# instead of every few seconds of virtual time; the running service does not need them.


def next_schedule_edge(
    schedules: Sequence[Schedule], delay_s: float, now: datetime
) -> datetime | None:
    """The first moment after ``now`` at which a window opens, closes, or stops holding
    the floor (``delay_s`` after it closed): the only times a schedule moves a target."""
    edges: list[datetime] = []
    for schedule in schedules:
        trigger = cron_trigger(schedule.cron, schedule.timezone)
        span = timedelta(seconds=schedule.duration_s + delay_s)
        fire = trigger.get_next_fire_time(None, now - span)
        for _ in range(10_000):  # a window per minute for a week, at most
            if fire is None:
                break
            opened = [fire, fire + span - timedelta(seconds=delay_s), fire + span]
            edges += [edge for edge in opened if edge > now]
            if fire > now:
                break
            fire = trigger.get_next_fire_time(fire, fire + timedelta(microseconds=1))
    return min(edges, default=None)


def keep_falls_below(
    policy: WarmPolicy,
    history: History,
    now: datetime,
    count: int,
    until: datetime,
    planned: datetime | None = None,
) -> datetime | None:
    """When, in (now, until], trim would first keep fewer than ``count`` workers if no
    request came meanwhile: a moment at most a second *before* it (never after, so a
    pass planned then is never late; one that comes too early finds nothing and asks
    again); None if it does not happen.

    Without new requests every estimate only decays, so what trim keeps never rises
    (schedule edges aside: ``until`` must not pass the next one) and a bisection over
    ``warm_target`` itself finds the moment.

    ``planned``: a pass the caller already runs then, and that asks again. When trim
    still keeps ``count`` at that moment, the answer would lie after ``planned`` less
    a second, too late to matter before that pass: None, after one evaluation instead
    of the bisection's ~13 (the replay's trim check after each ready callback, where a
    pass is nearly always planned at a provisioning timeout or a lease's deadline).
    """

    def keep_at(offset_s: float) -> int:
        later = History([age + offset_s for age in history.request_ages_s], history.provision_s)
        return warm_target(policy, later, now + timedelta(seconds=offset_s)).keep

    low, high = 0.0, (until - now).total_seconds()
    if high <= 0:
        return None
    first = high if planned is None else (planned - now).total_seconds()
    if 0 < first < high and keep_at(first) >= count:
        return None
    if keep_at(high) >= count:
        return None
    # Every step evaluated, even those after a ``planned`` that trim falls before: what
    # trim keeps can rise a little with time (an old request leaving the history lowers
    # the slow rate, and with it the noise the fast one is judged against). Taking those
    # steps as known moved a simulated week's figures (session 16, docs/capacity.md).
    while high - low > 1.0:
        middle = (low + high) / 2
        if keep_at(middle) < count:
            high = middle
        else:
            low = middle
    return now + timedelta(seconds=low)
