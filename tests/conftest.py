"""Shared fixtures: a service on a temporary SQLite file, a manual clock, the fake provisioner."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from service.app import create_app
from service.config import Config, config_from_dict
from service.db import session_factory, session_scope
from service.models import Worker
from service.passes.destroy import destroy
from service.passes.maintain import maintain
from service.passes.reconcile import reconcile
from service.passes.runtime import Runtime, build_runtime
from service.startup import prepare_database
from tests.integration.crash.support import STATS as CRASH_STATS
from tests.support.entry_points import install_distribution
from tests.support.fakes import FakeCloud, ManualClock, install
from tests.support.postgres import PostgresServer, PostgresUnavailable

# The test provisioners (fake, faulty) reach the registry as a third-party package's would.
install_distribution()

ADMIN_TOKEN = "test-admin-token-0123456789"
ENCRYPTION_KEY = "k6LRXbUB0_aVtUzMKLnH2vGqY0JYDSGOIpu8zJOOBUA="


def pool_config(name: str = "hosted-ubuntu", **overrides: Any) -> dict[str, Any]:
    pool = {
        "name": name,
        "os": "ubuntu",
        "provisioner": "fake",
        "min_ready": 2,
        "max_workers": 5,
        "lease_idle_timeout": "60m",
        "lease_max_lifetime": "72h",
        "provision_timeout": "10m",
        "pending_timeout": "30m",
    }
    pool.update(overrides)
    return pool


@pytest.fixture
def cloud() -> FakeCloud:
    return install()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway server per session; missing binaries fail the run (never a skip)."""
    try:
        server = PostgresServer.start()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every service-level test runs on both databases."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'workerlease.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


@pytest.fixture
def pools() -> list[dict[str, Any]]:
    return [pool_config()]


@pytest.fixture
def settings() -> dict[str, Any]:
    """Top-level config keys a test module overrides."""
    return {}


@pytest.fixture
def config(
    database_url: str, pools: list[dict[str, Any]], settings: dict[str, Any], cloud: FakeCloud
) -> Config:
    return config_from_dict(
        {
            "database_url": database_url,
            "admin_token": ADMIN_TOKEN,
            "encryption_key": ENCRYPTION_KEY,
            "deployment_id": "test",
            "public_url": "http://127.0.0.1:9",
            "pools": pools,
            **settings,
        }
    )


@pytest.fixture
def engine(config: Config) -> Iterator[Engine]:
    engine = prepare_database(config)
    yield engine
    engine.dispose()


@pytest.fixture
def app(config: Config, engine: Engine, clock: ManualClock) -> Iterator[Flask]:
    app = create_app(config, engine=engine, clock=clock)
    app.testing = True
    yield app
    app.extensions["workerlease"].close()  # PostgreSQL: the wakes relay's connections


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def rt(config: Config, engine: Engine, clock: ManualClock) -> Runtime:
    return build_runtime(config, engine, config.public_url or "", clock=clock)


@dataclass
class Service:
    """One handle on the whole service under test: HTTP client, jobs, clock, fake cloud."""

    client: FlaskClient
    rt: Runtime
    clock: ManualClock
    cloud: FakeCloud
    engine: Engine
    # worker id -> the worker token its agent got from the ready callback
    worker_tokens: dict[str, str] = field(default_factory=dict)

    def tick(self) -> None:
        """One scheduler round at the current time: maintain, then destroy."""
        maintain(self.rt)
        destroy(self.rt)

    def reconcile(self) -> None:
        reconcile(self.rt)

    def session(self) -> Session:
        return session_factory(self.engine)()

    def workers(self, state: str | None = None) -> list[Worker]:
        with session_scope(session_factory(self.engine)) as session:
            statement = select(Worker)
            if state:
                statement = statement.where(Worker.state == state)
            return list(session.exec(statement).all())

    def agents_report_ready(self) -> list[str]:
        """Every created, still-provisioning worker's agent calls back (as a real one would)."""
        ready = []
        for worker in self.workers("provisioning"):
            resource = self.cloud.resources.get(worker.id)
            if resource is None or resource.destroyed:
                continue
            response = self.client.post(
                f"/v1/workers/{worker.id}/ready",
                json={"agent_url": "http://127.0.0.1:1/", "address": "127.0.0.1"},
                headers=bearer(resource.spec.bootstrap_token),
            )
            assert response.status_code == 200, response.get_json()
            self.worker_tokens[worker.id] = response.get_json()["worker_token"]
            ready.append(worker.id)
        return ready

    def warm(self) -> None:
        """Fill the pools and let every agent report ready."""
        self.tick()
        self.agents_report_ready()

    def tenant(self, name: str = "acme") -> dict[str, str]:
        response = self.client.post(
            "/v1/admin/tenants", json={"name": name}, headers=bearer(ADMIN_TOKEN)
        )
        assert response.status_code == 201
        body: dict[str, str] = response.get_json()
        return body


@pytest.fixture
def svc(
    client: FlaskClient, rt: Runtime, clock: ManualClock, cloud: FakeCloud, engine: Engine
) -> Service:
    return Service(client, rt, clock, cloud, engine)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def admin() -> dict[str, str]:
    return bearer(ADMIN_TOKEN)


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("WORKERLEASE_CONFIG", "WORKERLEASE_ADMIN_TOKEN", "WORKERLEASE_DATABASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    os.environ.setdefault("PYTHONHASHSEED", "0")


# ---- the order of the run -----------------------------------------------------------
# The integration tests first: under pytest-xdist (make test) each process takes whole
# files, and the long ones (EC2's launch rate, the crash suite, services through bursts)
# started last left one process working alone at the end while the other had nothing.
_FIRST = ("integration", "client", "api", "unit")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def part(item: pytest.Item) -> int:
        parts = item.path.relative_to(Path(__file__).parent).parts
        return _FIRST.index(parts[0]) if parts[0] in _FIRST else len(_FIRST)

    items.sort(key=part)  # stable: the order within a part stays as collected


# ---- the crash suite's summary line (tests/integration/crash) ----------------------
# Written by the process with the terminal: under pytest-xdist (make test) that is the
# controller, which collects no tests, so each process sends its counts when it ends.


def pytest_sessionfinish(session: pytest.Session) -> None:
    sent = getattr(session.config, "workeroutput", None)  # set on an xdist process only
    if sent is not None and CRASH_STATS.used:
        sent["crash_stats"] = CRASH_STATS.as_dict()


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: unknown without the plugin
def pytest_testnodedown(node: Any, error: Any) -> None:
    counted = getattr(node, "workeroutput", {}).get("crash_stats")
    if counted is not None:
        CRASH_STATS.merge(counted)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    if not CRASH_STATS.used:
        return
    terminalreporter.write_sep("-", "crash suite")
    if CRASH_STATS.seeds:
        terminalreporter.write_line(
            "crash suite seeds: "
            + " ".join(str(s) for s in sorted(CRASH_STATS.seeds))
            + " (reproduce with WORKERLEASE_CRASH_SEED=<seed>)"
        )
    for line in CRASH_STATS.notes:
        terminalreporter.write_line(f"crash suite note: {line}")
    terminalreporter.write_line(CRASH_STATS.summary())
