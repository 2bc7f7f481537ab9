"""A client-side rate limit on every EC2 request, shared by all pools of the process.

Every EC2 request (botocore's retries included) waits its turn at a limiter shared
by all pools that talk to the same region and endpoint, so a refill burst does not
drain the account's EC2 token buckets (which other tools in the account share).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from provisioners.base import TransientProvisionerError


class RateLimiter:
    """At most ``calls`` calls start in any ``period`` seconds; callers queue in order.

    A classic token bucket of size b refilled at r/s admits b + r*T calls in a
    window of T seconds, so it cannot promise "at most 2 per second" with a
    burst of 2. This is the stricter variant: a bucket of ``calls`` tokens in
    which each token comes back ``period`` seconds after it was spent. Each
    caller reserves its start time under the lock, then sleeps outside it, so
    waiting threads are served first come, first served and none starves.
    """

    def __init__(
        self,
        calls: int,
        period: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.calls = calls
        self.period = period
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._starts: deque[float] = deque(maxlen=calls)

    def acquire(self, max_wait: float) -> None:
        """Wait for a turn; raise TransientProvisionerError if it is over ``max_wait`` away."""
        with self._lock:
            now = self._clock()
            start = now
            if self._starts:
                start = max(start, self._starts[-1])
            if len(self._starts) == self.calls:
                start = max(start, self._starts[0] + self.period)
            if start - now > max_wait:
                raise TransientProvisionerError(
                    f"client-side EC2 rate limit: next slot in {start - now:.1f}s "
                    f"(> {max_wait:.0f}s); too many calls queued"
                )
            self._starts.append(start)
        if start > now:
            self._sleep(start - now)


@dataclass(frozen=True)
class _Budget:
    calls: int
    period: float


# Budgets per API family. EC2 throttles per account and region with token buckets
# (https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html): the
# RunInstances resource bucket refills 2 instances/s, mutating actions refill about
# 5 requests/s, non-mutating (Describe*) about 20/s. We stay at or below the refill
# rates, because the buckets are shared with every other tool in the account. The
# 50 ms added to each period absorbs thread wake-up jitter, so calls observed on the
# wire also stay within the budget.
BUDGETS: dict[str, _Budget] = {
    "run": _Budget(calls=2, period=1.05),
    "terminate": _Budget(calls=5, period=1.05),
    "describe": _Budget(calls=20, period=1.05),
}
# The operations this provisioner sends, and the budget each draws from.
FAMILY_OF_OPERATION = {
    "RunInstances": "run",
    "TerminateInstances": "terminate",
    "DescribeInstances": "describe",
}
_limiters: dict[tuple[str, str, str], RateLimiter] = {}
_limiters_lock = threading.Lock()


def rate_limiter(region: str, endpoint_url: str | None, family: str) -> RateLimiter:
    """The process-wide limiter for one API family in one region and endpoint."""
    key = (region, endpoint_url or "", family)
    with _limiters_lock:
        limiter = _limiters.get(key)
        if limiter is None:
            budget = BUDGETS[family]
            limiter = _limiters[key] = RateLimiter(budget.calls, budget.period)
        return limiter
