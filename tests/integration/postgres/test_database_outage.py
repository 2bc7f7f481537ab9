"""The service survives a PostgreSQL restart: 503 problem documents while it is down,
``/readyz`` says so, and everything recovers by itself when it is back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from service.passes.destroy import destroy
from service.passes.maintain import maintain
from tests.support.fakes import FakeCloud, install
from tests.support.live import LiveService, live_service
from tests.support.postgres import PostgresServer

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

KEY = "k6LRXbUB0_aVtUzMKLnH2vGqY0JYDSGOIpu8zJOOBUA="


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A server of this test's own: it will be stopped and started again."""
    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture
def cloud() -> FakeCloud:
    return install()


def _fake_pool() -> dict[str, object]:
    return {
        "name": "hosted-ubuntu",
        "os": "ubuntu",
        "provisioner": "fake",
        "min_ready": 1,
        "max_workers": 4,
    }


def test_requests_get_503_while_the_database_is_down_and_recover_after(
    own_postgres: PostgresServer, cloud: FakeCloud
) -> None:
    url = own_postgres.create_database()
    with live_service(url, [_fake_pool()], "outage", encryption_key=KEY) as live:
        token = live.tenant_token()
        live.tick()
        _report_ready(live, cloud)
        lease = live.call("POST", "/v1/leases", token, json={"pool": "hosted-ubuntu"})
        assert lease.status_code == 201

        own_postgres.pause()
        down = live.call("GET", f"/v1/leases/{lease.json()['id']}", token)
        assert down.status_code == 503
        assert down.headers["Content-Type"] == "application/problem+json"
        assert down.json()["status"] == 503
        ready = requests.get(live.url + "/readyz", timeout=30)
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"].startswith("unreachable")
        with pytest.raises(Exception):  # noqa: B017 - a job run fails; the scheduler logs it
            maintain(live.rt)

        own_postgres.resume()
        again = live.call("GET", f"/v1/leases/{lease.json()['id']}", token)
        assert again.status_code == 200
        assert again.json()["state"] == "active"
        maintain(live.rt)
        destroy(live.rt)
        released = live.call("DELETE", f"/v1/leases/{lease.json()['id']}", token)
        assert released.json()["state"] == "released"


def _report_ready(live: LiveService, cloud: FakeCloud) -> None:
    for worker_id, resource in cloud.live().items():
        response = requests.post(
            f"{live.url}/v1/workers/{worker_id}/ready",
            timeout=30,
            json={"agent_url": "http://127.0.0.1:1"},
            headers={"Authorization": f"Bearer {resource.spec.bootstrap_token}"},
        )
        assert response.status_code == 200, response.text
