"""Execution containers for real: the agent runs a task with ``docker run`` of the
offline test image (``WORKERLEASE_CONTAINER_PULL=never``: nothing is ever pulled)
against the fake of the service's worker protocol."""

from __future__ import annotations

import base64
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.worker_service import AgentProcess, FakeWorkerService, start_agent

pytestmark = [pytest.mark.integration, pytest.mark.docker]

LABEL = "workerlease.task"
CANCEL_S = 10.0  # the contract: a cancelled task's container is gone within this
WAIT_S = 120.0  # bounds a hang only; a container starts in well under a second here


def task_containers(task_id: str) -> list[str]:
    listed = subprocess.run(
        ["docker", "ps", "--all", "--quiet", "--filter", f"label={LABEL}={task_id}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return listed.stdout.split()


@pytest.fixture
def fake(docker_engine: object) -> Iterator[FakeWorkerService]:
    service = FakeWorkerService().start()
    yield service
    service.stop()
    for task_id in service.tasks:
        for container in task_containers(task_id):
            subprocess.run(["docker", "rm", "--force", container], capture_output=True, check=False)


@pytest.fixture
def agent(fake: FakeWorkerService, tmp_path: Path) -> Iterator[Callable[[], AgentProcess]]:
    started: list[AgentProcess] = []

    def start() -> AgentProcess:
        process = start_agent(fake, tmp_path / "agent", WORKERLEASE_CONTAINER_PULL="never")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def test_task_runs_in_the_image_with_its_files_env_and_exit_code(
    fake: FakeWorkerService, agent: Callable[[], AgentProcess], testing_image: str
) -> None:
    process = agent()
    script = (
        'cat in.txt; echo "$GREETING"; pwd; echo made > out.txt; cat out.txt\n'
        "grep -q bookworm /etc/os-release && echo in-image\n"
        "echo to-stderr >&2; exit 3\n"
    )

    task = fake.wait_ended(
        fake.submit(
            script,
            container={"image": testing_image},
            env={"GREETING": "hello from env"},
            files={"in.txt": base64.b64encode(b"from a file\n").decode()},
        ),
        WAIT_S,
    )

    expected = b"from a file\nhello from env\n/workspace\nmade\nin-image\nto-stderr\n"
    assert bytes(task.log) == expected
    assert task.result == {
        "outcome": "exited",
        "exit_code": 3,
        "error": None,
        "log_bytes": len(expected),
    }
    assert task_containers(task.id) == []
    assert "hello from env" not in process.log()


def test_cancel_kills_the_container(
    fake: FakeWorkerService, agent: Callable[[], AgentProcess], testing_image: str
) -> None:
    agent()
    task_id = fake.submit("echo started; sleep 300", container={"image": testing_image})
    fake.wait_log(task_id, b"started\n", WAIT_S)
    assert len(task_containers(task_id)) == 1
    asked = time.monotonic()

    fake.cancel(task_id)

    task = fake.wait_ended(task_id, CANCEL_S)
    assert time.monotonic() - asked < CANCEL_S
    assert task.result["outcome"] == "cancelled"
    deadline = time.monotonic() + CANCEL_S
    while task_containers(task_id):
        assert time.monotonic() < deadline, "the task's container is still there"
        time.sleep(0.1)


def test_timeout_kills_the_container(
    fake: FakeWorkerService, agent: Callable[[], AgentProcess], testing_image: str
) -> None:
    agent()

    task = fake.wait_ended(
        fake.submit("echo started; sleep 300", container={"image": testing_image}, timeout_s=2),
        WAIT_S,
    )

    assert task.result["outcome"] == "timed_out"
    assert bytes(task.log) == b"started\n"
    deadline = time.monotonic() + CANCEL_S
    while task_containers(task.id):
        assert time.monotonic() < deadline, "the task's container is still there"
        time.sleep(0.1)


def test_missing_image_fails_to_start_with_the_engines_message(
    fake: FakeWorkerService, agent: Callable[[], AgentProcess]
) -> None:
    agent()

    task = fake.wait_ended(
        fake.submit("echo never", container={"image": "workerlease/no-such-image:0"}), WAIT_S
    )

    assert task.result["outcome"] == "failed_to_start"
    assert task.result["exit_code"] is None
    assert "No such image: workerlease/no-such-image:0" in task.result["error"]
    assert b"No such image" in bytes(task.log)  # the engine's words are in the log too
    assert b"never" not in bytes(task.log)


def test_a_script_exiting_125_is_its_own_exit_code(
    fake: FakeWorkerService, agent: Callable[[], AgentProcess], testing_image: str
) -> None:
    agent()

    task = fake.wait_ended(fake.submit("exit 125", container={"image": testing_image}), WAIT_S)

    assert task.result["outcome"] == "exited" and task.result["exit_code"] == 125
