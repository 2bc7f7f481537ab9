"""The alert rules in infra/monitoring: valid, and each alert unit-tested, by promtool.

``promtool`` comes from Debian's ``prometheus`` package (``.ci/ensure-promtool``, run by
``make test``); a missing one fails these tests with that hint, it never skips them.
The metric names the rules use are checked against a real ``/metrics`` in
``tests/integration/test_metrics_topologies.py``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

MONITORING = Path(__file__).resolve().parents[2] / "infra" / "monitoring"
RULES = MONITORING / "workerlease.rules.yml"


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
