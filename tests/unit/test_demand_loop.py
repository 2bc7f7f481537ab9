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
