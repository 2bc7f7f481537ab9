"""Prometheus metrics.

Counters and histograms are observed where things happen, in any process. ``serve``
always runs its process group (gunicorn master, web workers, the scheduler it
supervises) in prometheus_client's multiprocess mode with one shared directory
(``PROMETHEUS_MULTIPROC_DIR``), so every web worker's ``/metrics`` shows the sum of
all of them, the scheduler's job and doorbell counters included. A standalone
``workerlease scheduler`` exports its own on ``--metrics-port`` (:func:`start_exporter`).
Gauges of workers and leases per state are read from the database at scrape time,
so every replica reports the same truth, not its own memory.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import REGISTRY, Collector

from service.capacity import Target
from service.security import secret_equals

_BUCKETS_FAST = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1800,
)
_BUCKETS_SLOW = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)

LEASE_WAIT = Histogram(
    "workerlease_lease_wait_seconds",
    "Time from lease request to an assigned worker",
    ["pool"],
    buckets=_BUCKETS_FAST,
)
PROVISIONING = Histogram(
    "workerlease_provisioning_seconds",
    "Time from worker row created to agent ready",
    ["pool"],
    buckets=_BUCKETS_SLOW,
)
PROVISIONER_ERRORS = Counter(
    "workerlease_provisioner_errors_total",
    "Provisioner calls that failed",
    ["pool", "operation", "kind"],
)
LEASES_ENDED = Counter(
    "workerlease_leases_ended_total", "Leases ended, by reason", ["pool", "reason"]
)
JOB_RUNS = Counter("workerlease_job_runs_total", "Background job runs", ["job", "outcome"])
DOORBELL = Counter(
    "workerlease_doorbell_total",
    "Demand doorbell: rang, undelivered (the poll covers it), woke the scheduler, listen_error",
    ["event"],
)
WAKES = Counter(
    "workerlease_wakes_total",
    "Wakes between processes (PostgreSQL NOTIFY): sent, undelivered (the re-read covers it), "
    "received, listen_error",
    ["event"],
)
JOB_DURATION = Histogram(
    "workerlease_job_duration_seconds", "Background job run time", ["job"], buckets=_BUCKETS_FAST
)

FOREIGN_RESOURCES = Gauge(
    "workerlease_foreign_resources",
    "Resources under this deployment id made by another database (left alone by reconcile)",
    ["provisioner"],
    multiprocess_mode="max",
)
WAITING = Gauge(
    "workerlease_waiting_requests",
    "Lease requests waiting (wait_seconds) for their lease to become active",
    multiprocess_mode="livesum",
)
WAITS_REFUSED = Counter(
    "workerlease_waits_refused_total",
    "Lease requests refused (429) because their tenant already had the most waits allowed",
)
WAITER_POLL_ERRORS = Counter(
    "workerlease_waiter_poll_errors_total",
    "Failed re-reads of the leases that requests wait on (the database was unreachable)",
)
TASKS_ENDED = Counter(
    "workerlease_tasks_ended_total", "Tasks ended, by end state", ["pool", "state"]
)
TASK_DISPATCH = Histogram(
    "workerlease_task_dispatch_seconds",
    "Time from a task submitted to its agent starting it",
    ["pool"],
    buckets=_BUCKETS_FAST,
)
TASK_LOG_BYTES = Counter("workerlease_task_log_bytes_total", "Bytes of task output kept", ["pool"])
WAITERS = Gauge(
    "workerlease_task_waiters",
    "Requests waiting: agents' polls for work (poll) and tenants following logs (log)",
    ["kind"],
    multiprocess_mode="livesum",
)
WAITERS_REFUSED = Counter(
    "workerlease_task_waits_refused_total",
    "Polls or log follows refused (429): their owner already had the most allowed waiting",
    ["kind"],
)
WAITERS_POLL_ERRORS = Counter(
    "workerlease_task_waiter_poll_errors_total",
    "Failed re-reads for waiting polls and log follows (the database was unreachable)",
    ["kind"],
)

HTTP_REQUESTS = Counter(
    "workerlease_http_requests_total",
    "HTTP requests answered, by route template (never the raw path), method and status",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "workerlease_http_request_duration_seconds",
    "Time to answer an HTTP request (a wait_seconds request includes its wait)",
    ["route", "method"],
    buckets=_BUCKETS_FAST,
)
UNMATCHED_ROUTE = "<unmatched>"
# Any other method is one label value: a client cannot grow the label set.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def observe_request(route: str | None, method: str, status: int, seconds: float) -> None:
    """Count one answered request under its route template (``/v1/leases/<lease_id>``);
    ``route`` None (no route matched: 404, 405) is counted as ``<unmatched>``."""
    label_route = route or UNMATCHED_ROUTE
    label_method = method if method in _METHODS else "other"
    HTTP_REQUESTS.labels(label_route, label_method, str(status)).inc()
    HTTP_DURATION.labels(label_route, label_method).observe(seconds)


Snapshot = Callable[[], dict[str, list[tuple[dict[str, str], float]]]]


class DatabaseCollector(Collector):
    """Gauges read from the database when scraped."""

    HELP = {
        "workerlease_workers": "Workers per pool and state (destroyed excluded)",
        "workerlease_leases": "Live leases per pool and state",
        "workerlease_pool_degraded": "1 when the pool's creates or destroys are failing",
        "workerlease_pool_min_ready": "The pool's configured floor of ready workers",
        "workerlease_pool_warm_target": "Ready workers the refill keeps now (warm policy)",
        "workerlease_pool_warm_keep": "Ready workers trim keeps (the target held over "
        "scale_down_delay)",
        "workerlease_pool_schedule_min_ready": "Floor set by an open schedule window, or 0",
        "workerlease_pool_lease_rate_per_minute": "Lease requests per minute (EWMA), adaptive",
        "workerlease_pool_provision_mean_seconds": "Mean of recent provisioning times, adaptive",
    }

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, samples in self._snapshot().items():
            labels = sorted(samples[0][0]) if samples else []
            family = GaugeMetricFamily(name, self.HELP.get(name, name), labels=labels)
            for sample_labels, value in samples:
                family.add_metric([sample_labels[key] for key in labels], value)
            yield family


def warm_samples(targets: Mapping[str, Target]) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The warm targets as gauges (the adaptive figures only for adaptive pools)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {
        "workerlease_pool_warm_target": [({"pool": n}, t.ready) for n, t in targets.items()],
        "workerlease_pool_warm_keep": [({"pool": n}, t.keep) for n, t in targets.items()],
        "workerlease_pool_schedule_min_ready": [
            ({"pool": n}, t.schedule_min_ready) for n, t in targets.items()
        ],
        "workerlease_pool_lease_rate_per_minute": [],
        "workerlease_pool_provision_mean_seconds": [],
    }
    for name, target in targets.items():
        if target.rate_per_min is not None and target.provision_mean_s is not None:
            out["workerlease_pool_lease_rate_per_minute"].append(
                ({"pool": name}, target.rate_per_min)
            )
            out["workerlease_pool_provision_mean_seconds"].append(
                ({"pool": name}, target.provision_mean_s)
            )
    return out


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _counted_registry() -> CollectorRegistry:
    """What this process group counted: every process's files, or this process alone."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return registry
    return _ProcessRegistry()


def render(snapshot: Snapshot) -> tuple[bytes, str]:
    registry = _counted_registry()
    registry.register(DatabaseCollector(snapshot))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def process_exited(pid: int) -> None:
    """Forget a dead process's live gauges (its counters keep counting in the sums)."""
    if os.environ.get(MULTIPROC_ENV):
        mark_process_dead(pid)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every 15 s is not news


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def start_exporter(host: str, port: int, token: str | None) -> WSGIServer:
    """Serve this process's (or process group's) counters on ``http://host:port/metrics``.

    For the standalone scheduler: no database gauges (the API replicas export those
    once, not once per process). ``token``: the deployment's ``metrics_token``, asked
    for exactly as the API's ``/metrics`` asks for it.
    """
    metrics_app = make_wsgi_app(_counted_registry())
    expected = f"Bearer {token}" if token else None

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found; metrics are at /metrics\n"]
        if expected and not secret_equals(environ.get("HTTP_AUTHORIZATION", ""), expected):
            start_response("401 Unauthorized", [("Content-Type", "text/plain")])
            return [b"this endpoint needs the metrics token\n"]
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


class _ProcessRegistry(CollectorRegistry):
    """The default registry's collectors plus per-scrape ones, without mutating the default."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        yield from super().collect()
