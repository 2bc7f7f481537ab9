"""The client as tenants get it: ``pip install ./client`` into a fresh virtualenv pulls
httpx and nothing of the service, installs ``wl``, and is typed (``py.typed``, clean
under ``mypy --strict``, for the package itself and for code that uses it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from workerlease_client import __version__

CLIENT = Path(__file__).resolve().parents[2] / "client"
VENV_BIN = Path(sys.executable).parent
SERVER_ONLY = {
    "flask",
    "flask-openapi3",
    "sqlalchemy",
    "sqlmodel",
    "alembic",
    "apscheduler",
    "gunicorn",
    "gevent",
    "boto3",
    "botocore",
    "docker",
    "psycopg",
    "cryptography",
    "workerlease",
}

USAGE = """
from workerlease_client import Client, Result, WorkerleaseError


def step(data: bytes) -> Result:
    with Client() as wl, wl.lease("hosted-ubuntu", wait=600) as lease:
        result = lease.run(
            "kubectl apply -f deploy.yaml",
            image="bitnami/kubectl:1.31",
            files={"deploy.yaml": data},
        )
        print(result.exit_code, result.log)
        return result


def safe(data: bytes) -> int | None:
    try:
        return step(data).exit_code
    except WorkerleaseError as exc:
        print(exc.status, exc.title, exc.detail)
        return None
"""


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.integration
def test_pip_install_into_a_fresh_venv_pulls_no_server_dependency(tmp_path: Path) -> None:
    source = tmp_path / "client"  # a copy: the build writes into its source tree
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("*.egg-info", "build"))
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", source)

    listed = run(venv / "bin" / "python", "-m", "pip", "list", "--format=json").stdout
    installed = {item["name"].lower().replace("_", "-") for item in json.loads(listed)}
    assert {"workerlease-client", "httpx"} <= installed
    assert not installed & SERVER_ONLY, installed & SERVER_ONLY

    assert run(venv / "bin" / "wl", "--version").stdout == f"wl {__version__}\n"
    # Typed for its users: mypy --strict checks code against the installed package.
    (tmp_path / "usage.py").write_text(USAGE)
    run(
        VENV_BIN / "mypy",
        "--strict",
        "--no-incremental",
        "--python-executable",
        venv / "bin" / "python",
        "usage.py",
        cwd=tmp_path,
    )


def test_the_package_is_clean_under_mypy_strict() -> None:
    run(VENV_BIN / "mypy", "--strict", "--no-incremental", "workerlease_client", cwd=CLIENT)
