"""Read commands of the CLI never write: no pools applied, no database created.

Only ``serve``, ``scheduler`` and ``db upgrade`` apply the config's pools; ``tenants
list``, ``pools`` and the other database commands open an existing database as it is,
and without one they say so and exit non-zero.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from sqlmodel import select

from service.cli import main
from service.config import config_from_dict
from service.db import session_factory, session_scope
from service.models import Event, Pool
from service.startup import prepare_database

POOLS = [
    {"name": "hosted-ubuntu", "os": "ubuntu", "provisioner": "local", "min_ready": 0},
    {"name": "hosted-windows", "os": "windows", "provisioner": "local", "min_ready": 0},
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("WORKERLEASE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    umask = os.umask(0o022)  # the CLI sets 077 for its process: not for the test runner's
    os.umask(umask)
    yield
    os.umask(umask)


def _served_database(tmp_path: Path) -> str:
    """A database as ``serve`` leaves it: schema and both pools applied."""
    url = f"sqlite:///{tmp_path / 'served.db'}"
    engine = prepare_database(config_from_dict({"database_url": url, "pools": POOLS}))
    engine.dispose()
    return url


def _pool_state(url: str) -> tuple[dict[str, bool], list[str]]:
    from service.db import make_engine

    engine = make_engine(url)
    try:
        with session_scope(session_factory(engine)) as session:
            pools = {p.name: p.enabled for p in session.exec(select(Pool)).all()}
            reasons = [e.reason for e in session.exec(select(Event)).all()]
    finally:
        engine.dispose()
    return pools, reasons


def _run(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, list(args), env=env)


@pytest.mark.parametrize("command", [["tenants", "list"], ["pools"], ["tenants", "create", "x"]])
def test_without_a_database_a_command_says_so_and_creates_none(
    tmp_path: Path, command: list[str]
) -> None:
    result = _run(*command)
    assert result.exit_code != 0
    assert "no database configured" in result.output
    assert not (tmp_path / "workerlease.db").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["tenants", "list"], ["pools"]])
def test_a_missing_sqlite_file_is_reported_not_created(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "gone.db"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"database_url": f"sqlite:///{missing}"}))
    result = _run(*command, "--config", str(config))
    assert result.exit_code != 0
    assert f"{missing} does not exist" in result.output
    assert not missing.exists()


def test_tenants_list_without_config_leaves_the_pools_enabled(tmp_path: Path) -> None:
    url = _served_database(tmp_path)
    result = _run("tenants", "list", env={"WORKERLEASE_DATABASE_URL": url})
    assert result.exit_code == 0, result.output
    pools, reasons = _pool_state(url)
    assert pools == {"hosted-ubuntu": True, "hosted-windows": True}
    assert not [r for r in reasons if "removed from config" in r]


def test_pools_with_a_smaller_config_changes_nothing(tmp_path: Path) -> None:
    url = _served_database(tmp_path)
    config = tmp_path / "one-pool.yaml"
    config.write_text(yaml.safe_dump({"database_url": url, "pools": POOLS[:1]}))
    result = _run("pools", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "hosted-windows" in result.output
    pools, reasons = _pool_state(url)
    assert pools == {"hosted-ubuntu": True, "hosted-windows": True}
    assert not [r for r in reasons if "removed from config" in r]
