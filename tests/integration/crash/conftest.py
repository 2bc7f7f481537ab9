"""The crash suite's shared counters and its one summary line.

``crash_stats`` accumulates what the SIGKILL runs found (checked from the
database and from /proc, never from the service's own counters); at the end
of the session one line is written to the terminal, without ``-s`` (by
``tests/conftest.py``, which also gathers the counts of pytest-xdist's processes):

    crash suite: runs=4 kills=4 leaked=0 lost=0 double_leased=0

Full mode (``WORKERLEASE_CRASH_FULL=1``) runs many more kills and cycles; see
``tests/integration/crash/support.py``.
"""

from __future__ import annotations

import pytest

from tests.integration.crash.support import STATS, CrashStats


@pytest.fixture(scope="session")
def crash_stats() -> CrashStats:
    return STATS
