"""Tasks through ``wl`` and the SDK against a real serve whose local agents run them:
streamed output, exit codes (0, non-zero, 124), ``--json``, files and env, Ctrl-C and
SIGTERM cancelling and releasing, and the client README's examples as written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from workerlease_client import Client, Conflict, ValidationError

from tests.client.serving import POOL, WL, Served, one_line_error, wl
from tests.support.server import wait_until

pytestmark = pytest.mark.integration


def _as_from_a_terminal() -> None:
    """SIGINT as a terminal delivers it: a suite started in the background (a CI runner,
    ``nohup``, ``cmd &``) passes SIGINT on ignored, and Python then never raises
    KeyboardInterrupt; Ctrl-C on a terminal is what these tests stand for."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_task_commands_and_sdk_calls_against_the_real_task_api(served: Served) -> None:
    token = served.tenant()
    with Client(served.url, token) as client, client.lease(POOL, wait=120) as lease:
        submitted = wl(
            served,
            token,
            "task",
            "run",
            lease.id,
            "--detach",
            "--json",
            "--timeout",
            "90",
            "--env",
            "A=1",
            "--",
            "sleep 100",
        )
        assert submitted.returncode == 0, submitted.stderr
        task = json.loads(submitted.stdout)
        assert task["lease_id"] == lease.id and task["timeout_s"] == 90
        assert task["state"] in ("queued", "running")

        listed = json.loads(wl(served, token, "task", "list", lease.id, "--json").stdout)
        assert [t["id"] for t in listed["tasks"]] == [task["id"]]
        table = wl(served, token, "task", "list", lease.id)
        assert table.stdout.splitlines()[0].split()[:3] == ["ID", "STATE", "EXIT"]
        assert task["id"] in table.stdout
        so_far = json.loads(wl(served, token, "task", "log", lease.id, task["id"], "--json").stdout)
        assert so_far["next_offset"] == len(so_far["log"].encode())

        cancelled = wl(served, token, "task", "cancel", lease.id, task["id"], "--json")
        assert cancelled.returncode == 0, cancelled.stderr
        wait_until(
            lambda: lease.task(task["id"]).info.state == "cancelled",
            60,
            message="the cancelled task never ended",
        )
        followed = wl(served, token, "task", "log", lease.id, task["id"], "--follow")
        assert followed.returncode == 0, followed.stderr  # ends: the task has ended

        with pytest.raises(ValidationError) as refused:
            lease.submit("true", files={"../outside": b"x"})
        assert refused.value.status == 422 and refused.value.errors
        missing = wl(served, token, "task", "cancel", lease.id, "t-00000000000000000000")
        assert missing.returncode == 1 and one_line_error(missing).startswith("error: ")
    with pytest.raises(Conflict):  # the lease has been released: no new tasks
        Client(served.url, token).submit_task(lease.id, "true")


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_sigint_during_wl_run_cancels_the_task_and_releases_the_lease(
    served: Served, signum: int, code: int
) -> None:
    token = served.tenant()
    env = {**os.environ, "WORKERLEASE_URL": served.url, "WORKERLEASE_TOKEN": token}
    process = subprocess.Popen(
        [WL, "run", POOL, "--wait", "120", "--", "echo started; sleep 120; echo never"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_as_from_a_terminal,
    )
    try:

        def task_submitted() -> list[dict[str, Any]]:
            leases = served.leases(token, "live")
            return served.tasks_of(token, leases[0]["id"]) if leases else []

        wait_until(task_submitted, 120, message="wl run never submitted its task")
        process.send_signal(signum)
        assert process.wait(120) == code
        stderr = process.stderr.read()  # type: ignore[union-attr]
        assert "Interrupted: task cancelled and lease released" in stderr, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    (lease,) = served.leases(token)
    assert lease["state"] == "released"
    (task,) = served.tasks_of(token, lease["id"])
    assert task["state"] == "cancelled"


def test_wl_run_streams_output_and_returns_the_exit_code(served: Served) -> None:
    token = served.tenant()
    ok = wl(served, token, "run", POOL, "--wait", "120", "--", "echo hello; echo ünïcode ✓")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "hello\nünïcode ✓\n"
    failed = wl(served, token, "run", POOL, "--wait", "120", "--", "echo before; exit 3")
    assert failed.returncode == 3 and failed.stdout == "before\n", failed.stderr
    timed_out = wl(served, token, "run", POOL, "--wait", "120", "--timeout", "1", "--", "sleep 60")
    assert timed_out.returncode == 124, timed_out.stderr
    assert one_line_error(timed_out).startswith("error: Timed out")
    assert all(lease["state"] == "released" for lease in served.leases(token))


def test_wl_run_output_comes_while_the_script_runs(served: Served) -> None:
    token = served.tenant()
    env = {**os.environ, "WORKERLEASE_URL": served.url, "WORKERLEASE_TOKEN": token}
    process = subprocess.Popen(
        [WL, "run", POOL, "--wait", "120", "--", "echo started; sleep 120"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_as_from_a_terminal,
    )
    try:
        first_line: list[str] = []
        reader = threading.Thread(
            target=lambda: first_line.append(process.stdout.readline())  # type: ignore[union-attr]
        )
        reader.start()
        reader.join(120)
        assert first_line == ["started\n"] and process.poll() is None
        process.send_signal(signal.SIGINT)
        assert process.wait(120) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    (lease,) = served.leases(token)
    assert lease["state"] == "released"
    assert served.tasks_of(token, lease["id"])[0]["state"] == "cancelled"


def test_wl_run_json_env_and_files(served: Served, tmp_path: Path) -> None:
    token = served.tenant()
    local = tmp_path / "input.txt"
    local.write_text("from a file\n")
    result = wl(
        served,
        token,
        "run",
        POOL,
        "--json",
        "--env",
        "GREETING=hi there",
        "--file",
        f"{local}:data/in.txt",
        "--",
        'echo "$GREETING"; cat data/in.txt; exit 4',
    )
    assert result.returncode == 4, result.stderr
    report = json.loads(result.stdout)
    assert report["exit_code"] == 4 and report["state"] == "failed"
    assert report["log"] == "hi there\nfrom a file\n"
    assert report["lease"]["pool"] == POOL
    assert served.lease(token, report["lease"]["id"])["state"] == "released"


def test_sdk_run_with_files_and_a_log_that_follows(served: Served) -> None:
    token = served.tenant()
    chunks: list[str] = []
    with Client(served.url, token) as client, client.lease(POOL, wait=120) as lease:
        result = lease.run(
            "cat deploy.yaml; printf 'é%.0s' 1 2 3",
            files={"deploy.yaml": b"kind: Deployment\n"},
            on_output=chunks.append,
        )
        assert (result.exit_code, result.state) == (0, "succeeded")
        assert result.log == "kind: Deployment\nééé"
        assert "".join(chunks) == result.log
        task = lease.submit("echo one; sleep 60")
        task.cancel()
        assert task.wait(timeout=120).state == "cancelled"


def test_the_readme_examples_work_as_written(served: Served, tmp_path: Path) -> None:
    token = served.tenant()
    readme = (Path(__file__).resolve().parents[2] / "client" / "README.md").read_text()
    python_block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    wl_run = next(
        line for line in readme.splitlines() if line.startswith("wl run hosted-ubuntu -- '")
    )
    env = {**os.environ, "WORKERLEASE_URL": served.url, "WORKERLEASE_TOKEN": token}
    (tmp_path / "example.py").write_text(python_block)
    sdk = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert sdk.returncode == 0, sdk.stderr
    assert sdk.stdout.startswith("3 failed\nhello from "), sdk.stdout
    env["PATH"] = f"{Path(WL).parent}:{env['PATH']}"
    shell = subprocess.run(
        ["bash", "-c", wl_run], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.startswith("hello from "), shell.stdout
    assert all(lease["state"] == "released" for lease in served.leases(token))
