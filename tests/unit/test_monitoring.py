"""The alert rules and the Grafana dashboard in infra/monitoring, checked by promtool.

The rules are valid and each alert is unit-tested; every dashboard query is valid PromQL
(promtool checks it as a recording rule, Grafana's variables given sample values).

``promtool`` comes from Debian's ``prometheus`` package (``.ci/ensure-promtool``, run by
``make test``); a missing one fails these tests with that hint, it never skips them.
The metric names the rules and the dashboard use are checked against a real ``/metrics`` in
``tests/integration/test_metrics_topologies.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

MONITORING = Path(__file__).resolve().parents[2] / "infra" / "monitoring"
RULES = MONITORING / "workerlease.rules.yml"
DASHBOARD = MONITORING / "workerlease.dashboard.json"
# Grafana's variables, as Grafana would substitute them.
GRAFANA_VARIABLES = {"$pool": ".*", "$__rate_interval": "1m", "$__range": "1h"}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: run .ci/ensure-promtool (make test does)", pytrace=False)
    return subprocess.run(
        [promtool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=120
    )


def rule_metric_names() -> set[str]:
    """Every workerlease_* metric the rules read."""
    return set(re.findall(r"\bworkerlease_[a-z_]+", RULES.read_text()))


def dashboard_expressions() -> list[str]:
    """Every query of the dashboard's panels, with Grafana's variables substituted."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    expressions = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    for variable, value in GRAFANA_VARIABLES.items():
        expressions = [expr.replace(variable, value) for expr in expressions]
    return expressions


def dashboard_metric_names() -> set[str]:
    """Every workerlease_* metric the dashboard reads, without a histogram's suffix."""
    names = set(re.findall(r"\bworkerlease_[a-z_]+", " ".join(dashboard_expressions())))
    return {re.sub(r"_bucket$", "", name) for name in names}


def test_the_rules_are_valid() -> None:
    result = _promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_every_alert_fires_when_it_should_and_only_then() -> None:
    result = _promtool("test", "rules", "workerlease.rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(
        re.findall(r"alertname: (\w+)", (MONITORING / "workerlease.rules.test.yml").read_text())
    )
    alerts = set(re.findall(r"- alert: (\w+)", RULES.read_text()))
    assert alerts and alerts <= tested, f"alerts without a unit test: {alerts - tested}"


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    expressions = dashboard_expressions()
    assert not [e for e in expressions if "$" in e], "a Grafana variable the test does not know"
    rules = tmp_path / "dashboard.rules.yml"
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for number, expr in enumerate(expressions):
        lines += [f"      - record: dashboard:query_{number}", f"        expr: {json.dumps(expr)}"]
    rules.write_text("\n".join(lines) + "\n")
    result = _promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in result.stdout


def test_the_dashboard_covers_pools_jobs_and_tasks() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panel_ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
    assert {
        "workerlease_workers",
        "workerlease_leases",
        "workerlease_lease_wait_seconds",
        "workerlease_provisioning_seconds",
        "workerlease_pool_degraded",
        "workerlease_job_runs_total",
        "workerlease_job_duration_seconds",
        "workerlease_tasks_ended_total",
        "workerlease_task_dispatch_seconds",
        "workerlease_task_waiters",
        "workerlease_waiting_requests",
    } <= dashboard_metric_names()
