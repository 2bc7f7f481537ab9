"""A client generated with ``openapi-python-client`` from a real serve's ``/openapi.json``
runs a lease-and-task cycle against that serve (tests/client/generated/cycle.py), and
code using it is clean under ``mypy --strict``.

The generator gets a virtualenv of its own (it pins its own pydantic, typer, ruff);
it must generate without a single warning. mypy follows the generated package
silently: the generator's own template code (its ``Client.__exit__``) is not what
this checks; the calls, models and enums that the document gives it are.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import ServerProcess, pool

pytestmark = pytest.mark.integration

CYCLE = Path(__file__).parent / "generated" / "cycle.py"
GENERATOR_CONFIG = (
    "package_name_override: workerlease_api\nproject_name_override: workerlease-api\n"
)


def run(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with openapi-python-client and what the generated code imports."""
    venv = tmp_path_factory.mktemp("generator") / "venv"
    run(sys.executable, "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q"]
    run(*pip, "openapi-python-client>=0.21", "python-dateutil")
    return venv


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    served = ServerProcess(tmp_path_factory.mktemp("serve"), pools=[pool(min_ready=1)])
    try:
        served.start()
        served.wait_ready_workers(1)
        yield served
    finally:
        served.close()


def test_a_generated_client_runs_a_lease_and_task_cycle_and_type_checks(
    generator: Path, server: ServerProcess, tmp_path: Path
) -> None:
    document = server.request("GET", "/openapi.json")
    assert document.status_code == 200
    (tmp_path / "openapi.json").write_text(document.text)
    (tmp_path / "generator.yaml").write_text(GENERATOR_CONFIG)
    env = {**os.environ, "PATH": f"{generator / 'bin'}:{os.environ['PATH']}"}  # its ruff
    generated = run(
        generator / "bin" / "openapi-python-client",
        "generate",
        "--path",
        "openapi.json",
        "--meta",
        "none",
        "--config",
        "generator.yaml",
        "--output-path",
        "gen/workerlease_api",
        "--fail-on-warning",
        cwd=tmp_path,
        env=env,
    )
    assert "Warning" not in generated.stdout + generated.stderr, generated.stdout

    token = server.create_tenant("generated")["token"]
    cycle = run(
        generator / "bin" / "python",
        CYCLE,
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(tmp_path / "gen"), "WL_URL": server.url, "WL_TOKEN": token},
    )
    assert cycle.stdout.strip() == "cycle ok"

    run(
        Path(sys.executable).parent / "mypy",
        "--strict",
        "--no-incremental",
        "--follow-imports=silent",
        "--python-executable",
        generator / "bin" / "python",
        CYCLE,
        cwd=tmp_path,
        env={**env, "MYPYPATH": str(tmp_path / "gen")},
    )
