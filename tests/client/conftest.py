"""The client's tests against a real serve: one server per test module (see serving.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.client.serving import POOL, SHORT, SHORT_IDLE_S, Served
from tests.support.server import ServerProcess, pool


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = ServerProcess(
        tmp_path_factory.mktemp("serve"),
        pools=[
            pool(POOL, min_ready=2, max_workers=6),
            pool(SHORT, min_ready=1, max_workers=3, lease_idle_timeout=f"{SHORT_IDLE_S}s"),
        ],
    )
    try:
        server.start()
        server.wait_ready_workers(1)
        yield Served(server)
    finally:
        server.close()
