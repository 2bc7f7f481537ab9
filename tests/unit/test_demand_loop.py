"""The demand loop: passes on the bell or the poll, and the poll survives a broken bell."""

from __future__ import annotations

import time
from typing import Any

import pytest

from service import scheduler
from service.doorbell import Bell, Listener
from service.passes.runtime import Runtime


class _BrokenListener(Listener):
    def wait(self, timeout: float) -> bool:
        raise RuntimeError("the bell's socket broke")


class _BrokenBell(Bell):
    def ring(self) -> None:
        pass

    def listener(self) -> Listener:
        return _BrokenListener()


def test_a_broken_bell_leaves_the_poll_running(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[float] = []

    def count_pass(_rt: Runtime, now: Any = None, wait: bool = True) -> None:
        passes.append(time.monotonic())

    monkeypatch.setattr(scheduler, "answer_demand", count_pass)
    rt.bell = _BrokenBell()
    rt.settings = rt.settings.model_copy(update={"demand_interval": 0.05})
    loop = scheduler.DemandLoop(rt)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while len(passes) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        loop.stop()
    assert len(passes) >= 3, "the demand pass stopped with the bell"


class _BurstListener(Listener):
    """Rings ``rings`` times at once, then stays quiet (each wait drains what is queued)."""

    def __init__(self, rings: int) -> None:
        self.queued = rings

    def wait(self, timeout: float) -> bool:
        if self.queued:
            self.queued = 0
            return True
        time.sleep(timeout)
        return False


class _BurstBell(Bell):
    def __init__(self, listener: Listener) -> None:
        self._listener = listener

    def ring(self) -> None:
        pass

    def listener(self) -> Listener:
        return self._listener


def test_a_burst_of_rings_answers_pending_at_once_and_refills_in_one_pass(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[bool] = []

    def record_pass(_rt: Runtime, now: Any = None, wait: bool = True, rung: bool = False) -> None:
        passes.append(rung)

    monkeypatch.setattr(scheduler, "answer_demand", record_pass)
    rt.bell = _BurstBell(_BurstListener(rings=10))
    rt.settings = rt.settings.model_copy(update={"demand_interval": 0.05})
    loop = scheduler.DemandLoop(rt)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while passes.count(False) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        loop.stop()
    assert passes[:2] == [False, True], "a ring answers pending leases first, then refills"
    assert passes.count(True) == 1, "ten rings at once made more than one refill pass"
