"""The crash suite's shared counters and its one summary line.

``crash_stats`` accumulates what the SIGKILL runs found (checked from the
database and from /proc, never from the service's own counters); at the end
of the session one line is written to the terminal, without ``-s``:

    crash suite: runs=4 kills=4 leaked=0 lost=0 double_leased=0

Full mode (``WORKERLEASE_CRASH_FULL=1``) runs many more kills and cycles; see
``tests/integration/crash/support.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.crash.support import STATS, CrashStats


@pytest.fixture(scope="session")
def crash_stats() -> CrashStats:
    return STATS


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    if not STATS.used:
        return
    terminalreporter.write_sep("-", "crash suite")
    if STATS.seeds:
        terminalreporter.write_line(
            "crash suite seeds: "
            + " ".join(str(s) for s in sorted(STATS.seeds))
            + " (reproduce with WORKERLEASE_CRASH_SEED=<seed>)"
        )
    for line in STATS.notes:
        terminalreporter.write_line(f"crash suite note: {line}")
    terminalreporter.write_line(STATS.summary())
