"""Every metric the code counts reaches a ``/metrics`` in each documented topology.

Real processes: ``serve`` with one web worker, with two, and ``serve --no-scheduler``
beside a standalone ``workerlease scheduler --metrics-port``. A lease on a pool with
``min_ready: 0`` must wait, so the web worker rings the doorbell, the scheduler wakes,
runs its jobs and creates a worker: counters of both processes, which must show up.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import service.metrics  # noqa: F401 - declares the service's metrics in REGISTRY
from tests.support.server import ServerProcess, free_port, pool, port_listening, wait_until
from tests.unit.test_monitoring import dashboard_metric_names, rule_metric_names

pytestmark = pytest.mark.integration

POOL = "hosted-ubuntu"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# Counted in the scheduler process (jobs, doorbell wake-ups) ...
SCHEDULER_SAMPLES = [
    ("workerlease_job_runs_total", {"job": "maintain", "outcome": "ok"}),
    ("workerlease_job_runs_total", {"job": "demand", "outcome": "ok"}),
    ("workerlease_job_duration_seconds_count", {"job": "maintain"}),
    ("workerlease_doorbell_total", {"event": "woke"}),
]
# ... and in the web workers (the ring, the agent's ready callback, the wait).
WEB_SAMPLES = [
    ("workerlease_doorbell_total", {"event": "rang"}),
    ("workerlease_provisioning_seconds_count", {"pool": POOL}),
    ("workerlease_lease_wait_seconds_count", {"pool": POOL}),
]


def scrape(url: str) -> Samples:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def missing(samples: Samples, wanted: list[tuple[str, dict[str, str]]]) -> list[str]:
    return [
        f"{name}{labels}"
        for name, labels in wanted
        if samples.get((name, frozenset(labels.items())), 0) <= 0
    ]


def lease_that_waits(server: ServerProcess) -> None:
    """A lease with no ready worker: pending (202), then served by a new worker."""
    token = server.create_tenant("acme")["token"]
    response = server.request(
        "POST", "/v1/leases", token=token, json={"pool": POOL, "wait_seconds": 60}, timeout=90
    )
    assert response.status_code in (201, 202), response.text
    lease = response.json()
    if lease["state"] != "active":
        wait_until(
            lambda: (
                server.request("GET", f"/v1/leases/{lease['id']}", token=token).json()["state"]
                == "active"
            ),
            90,
            message="the waiting lease was never served",
        )


def assert_every_scrape_shows(
    url: str, wanted: list[tuple[str, dict[str, str]]], scrapes: int, log: Callable[[], str]
) -> None:
    """Each of ``scrapes`` scrapes in a row shows every wanted sample (whichever web
    worker answers it); counters are polled with a deadline, then must stay."""
    wait_until(
        lambda: not missing(scrape(url), wanted),
        60,
        message=lambda: f"missing {missing(scrape(url), wanted)} on {url}\n{log()}",
    )
    for _ in range(scrapes):
        assert missing(scrape(url), wanted) == []


def assert_http_requests_are_counted_by_route(server: ServerProcess) -> None:
    """Requests count under their route template, never a raw path with an id in it;
    a path no route matches counts as ``<unmatched>``."""
    token = server.create_tenant("counted")["token"]
    for _ in range(3):
        assert (
            server.request("GET", "/v1/leases/l-00000000000000004711", token=token).status_code
            == 404
        )
        assert server.request("GET", "/no/such/path-4711").status_code == 404
    wanted = [
        ("workerlease_http_requests_total", {"route": "/v1/leases", "method": "POST", "status": s})
        for s in ("201", "202")
    ]
    by_route = [
        ("workerlease_http_requests_total", labels)
        for labels in (
            {"route": "/v1/leases/<lease_id>", "method": "GET", "status": "404"},
            {"route": "<unmatched>", "method": "GET", "status": "404"},
            {"route": "/v1/admin/tenants", "method": "POST", "status": "201"},
        )
    ] + [
        ("workerlease_http_request_duration_seconds_count", {"route": r, "method": "GET"})
        for r in ("/v1/leases/<lease_id>", "<unmatched>")
    ]
    url = f"{server.url}/metrics"
    wait_until(
        lambda: (
            not missing(scrape(url), by_route) and len(missing(scrape(url), wanted)) < len(wanted)
        ),  # 201 or 202, as it went
        30,
        message=lambda: f"missing {missing(scrape(url), by_route)}\n{server.log_tail()}",
    )
    routes = {
        dict(labels)["route"]
        for name, labels in scrape(url)
        if name.startswith("workerlease_http_request")
    }
    assert not [r for r in routes if "4711" in r], routes
    assert all(r.startswith("/") or r == "<unmatched>" for r in routes), routes


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    servers: list[ServerProcess] = []

    def make(**kwargs: object) -> ServerProcess:
        server = ServerProcess(
            tmp_path,
            pools=[pool(min_ready=0, max_workers=2)],
            **kwargs,  # type: ignore[arg-type]
        )
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.mark.parametrize("web_workers", [1, 2])
def test_serve_shows_the_scheduler_and_web_metrics(
    make_server: Callable[..., ServerProcess], web_workers: int
) -> None:
    server = make_server(serve_args=["--workers", str(web_workers)]).start()
    lease_that_waits(server)
    assert_every_scrape_shows(
        f"{server.url}/metrics", SCHEDULER_SAMPLES + WEB_SAMPLES, 6, server.log_tail
    )
    assert_http_requests_are_counted_by_route(server)
    # Every metric the alert rules and the Grafana dashboard read is exported (a renamed
    # one would never fire, or draw nothing). A labelled metric has no series before its
    # first count (no provisioner error, no task here): those must at least be declared
    # by service.metrics under that name.
    exported = {name for name, _ in scrape(f"{server.url}/metrics")}
    exported |= {re.sub(r"_(total|count|sum|bucket|created)$", "", n) for n in exported}
    declared = {
        sample_name
        for family in REGISTRY.collect()
        for sample_name in (family.name, f"{family.name}_total")
    }
    unknown = (rule_metric_names() | dashboard_metric_names()) - exported
    assert unknown <= {
        "workerlease_provisioner_errors_total",
        "workerlease_tasks_ended_total",
        "workerlease_task_dispatch_seconds",
        "workerlease_task_waiters",
    }
    assert unknown <= declared


def test_a_standalone_scheduler_serves_its_own_metrics(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = make_server(serve_args=["--no-scheduler"])
    port = free_port()
    log_path = tmp_path / "scheduler.log"
    command = [
        sys.executable,
        "-m",
        "service.cli",
        "scheduler",
        "--config",
        str(server.config_path),
        "--public-url",
        server.url,
        "--metrics-port",
        str(port),
    ]
    with open(log_path, "wb") as log:
        scheduler = subprocess.Popen(
            command, env=server.env(), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_until(
            lambda: "scheduler_running" in log_path.read_text() and port_listening(port),
            60,
            message=lambda: log_path.read_text(),
        )
        server.start()
        lease_that_waits(server)
        assert_every_scrape_shows(
            f"http://127.0.0.1:{port}/metrics", SCHEDULER_SAMPLES, 3, log_path.read_text
        )
        # The API replica still exports what its own processes count.
        assert_every_scrape_shows(f"{server.url}/metrics", WEB_SAMPLES, 3, server.log_tail)
    finally:
        scheduler.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            scheduler.wait(30)
        if scheduler.poll() is None:
            scheduler.kill()
            scheduler.wait(10)
