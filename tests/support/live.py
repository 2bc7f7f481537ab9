"""The service on a real HTTP server in this process, with the scheduler's passes run by hand.

For integration tests against real provisioners (Docker, moto): the agents call back
over real HTTP, while the test decides when the jobs run (``tick``), so assertions
do not race a background scheduler.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import requests
from werkzeug.serving import BaseWSGIServer, make_server

from service.app import create_app
from service.config import config_from_dict
from service.passes.destroy import destroy
from service.passes.maintain import maintain
from service.passes.reconcile import reconcile
from service.passes.runtime import Runtime, build_runtime
from service.startup import prepare_database

ADMIN_TOKEN = "live-admin-token-0123456789"


@dataclass
class LiveService:
    url: str
    rt: Runtime
    server: BaseWSGIServer

    def tick(self, now: datetime | None = None) -> None:
        """One maintain and one destroy pass, at ``now`` (default: the clock's time)."""
        maintain(self.rt, now)
        destroy(self.rt, now)

    def reconcile(self) -> None:
        reconcile(self.rt)

    def call(self, method: str, path: str, token: str = ADMIN_TOKEN, **kwargs: Any) -> Any:
        response = requests.request(
            method,
            self.url + path,
            timeout=30,
            headers={"Authorization": f"Bearer {token}"},
            **kwargs,
        )
        return response

    def tenant_token(self, name: str = "acme") -> str:
        response = self.call("POST", "/v1/admin/tenants", json={"name": name})
        assert response.status_code == 201, response.text
        token: str = response.json()["token"]
        return token

    def pool_counts(self, pool: str) -> dict[str, int]:
        pools = self.call("GET", "/v1/admin/pools").json()["pools"]
        counts: dict[str, int] = next(p["counts"] for p in pools if p["name"] == pool)
        return counts

    def tick_until(
        self,
        done: Callable[[], bool],
        timeout_s: float = 120,
        every_s: float = 0.3,
        progress: Callable[[], object] | None = None,
    ) -> None:
        """Run scheduler rounds until ``done()``; ``timeout_s`` bounds a hang only.

        ``progress``: a reading that changes as the work advances (e.g. how many leases are
        active); each change gives ``timeout_s`` again, so a slow machine that keeps
        advancing is waited for and only a stall fails.
        """
        deadline = time.monotonic() + timeout_s
        seen = progress() if progress is not None else None
        while time.monotonic() < deadline:
            self.tick()
            if done():
                return
            if progress is not None and (now_seen := progress()) != seen:
                seen, deadline = now_seen, time.monotonic() + timeout_s
            time.sleep(every_s)
        raise AssertionError(f"condition not reached within {timeout_s}s without progress")


@contextmanager
def live_service(
    database_url: str,
    pools: list[dict[str, Any]],
    deployment_id: str,
    host: str = "127.0.0.1",
    **extra: Any,
) -> Iterator[LiveService]:
    """``host``: where the server listens ("0.0.0.0" for docker pools on a bridge, whose
    agents call back at the gateway address); the service URL stays on 127.0.0.1."""
    server = make_server(host, 0, lambda e, s: app(e, s), threaded=True)
    url = f"http://127.0.0.1:{server.server_port}"
    config = config_from_dict(
        {
            "database_url": database_url,
            "admin_token": ADMIN_TOKEN,
            "deployment_id": deployment_id,
            "public_url": url,
            "pools": pools,
            **extra,
        }
    )
    engine = prepare_database(config)
    app = create_app(config, engine=engine)
    rt = build_runtime(config, engine, url)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield LiveService(url, rt, server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        app.extensions["workerlease"].close()
        rt.provisioners.close()
        engine.dispose()
