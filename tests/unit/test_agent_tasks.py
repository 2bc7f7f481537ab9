"""The agent's task side (docs/tasks.md, "Worker protocol"): the real agent, as a
process, against a fake of the service's worker endpoints (tests/support/worker_service).

Every wait is for an outcome, bounded by a deadline that only a hang reaches.
"""

from __future__ import annotations

import base64
import importlib.util
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.worker_service import (
    AGENT,
    BOOTSTRAP_TOKEN,
    WAIT_S,
    WORKER_TOKEN,
    AgentProcess,
    FakeWorkerService,
    start_agent,
)

# The contract: a cancel reaches the process tree within 10 s.
CANCEL_S = 10.0


@pytest.fixture
def fake() -> Iterator[FakeWorkerService]:
    service = FakeWorkerService().start()
    yield service
    service.stop()


@pytest.fixture
def agent(fake: FakeWorkerService, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(**env: str) -> AgentProcess:
        process = start_agent(fake, tmp_path / f"agent{len(started)}", **env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pid_gone(pid: int) -> bool:
    """Gone, or a zombie (nothing here reaps the orphans of a killed script)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.05)


def read_pid(path: Path) -> int:
    wait_until(lambda: path.exists() and path.read_text().strip() != "")
    return int(path.read_text())


def test_output_arrives_in_order_with_exact_bytes(
    fake: FakeWorkerService, agent: Callable[..., AgentProcess]
) -> None:
    agent()
    script = (
        "printf 'out1\\n'; printf 'err1\\n' >&2; printf 'out2\\n'; printf 'err2\\n' >&2\n"
        "printf '\\377\\000\\001'\n"
        "head -c 3000000 /dev/zero | tr '\\000' 'a'\n"  # several 1 MiB chunks
        "printf 'end\\n' >&2\n"
    )
    expected = b"out1\nerr1\nout2\nerr2\n\xff\x00\x01" + b"a" * 3_000_000 + b"end\n"

    task = fake.wait_ended(fake.submit(script))

    assert bytes(task.log) == expected
    assert task.result == {
        "outcome": "exited",
        "exit_code": 0,
        "error": None,
        "log_bytes": len(expected),
    }
    assert task.finish_statuses == [200]


def test_non_zero_exit_code_is_reported(
    fake: FakeWorkerService, agent: Callable[..., AgentProcess]
) -> None:
    agent()

    task = fake.wait_ended(fake.submit("echo failing; exit 7"))

    assert task.result["outcome"] == "exited" and task.result["exit_code"] == 7
    assert bytes(task.log) == b"failing\n"


def test_timeout_kills_the_whole_tree(
    fake: FakeWorkerService, agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agent()
    pidfile = tmp_path / "child.pid"
    script = f'sleep 300 &\necho $! > "{pidfile}"\necho waiting\nsleep 300\n'

    task = fake.wait_ended(fake.submit(script, timeout_s=1))

    assert task.result["outcome"] == "timed_out" and task.result["exit_code"] is None
    assert bytes(task.log) == b"waiting\n"
    child = read_pid(pidfile)
    wait_until(lambda: pid_gone(child), CANCEL_S)


@pytest.mark.parametrize("through", ["poll", "log"])
def test_cancel_kills_the_tree_within_the_deadline(
    through: str, fake: FakeWorkerService, agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    fake.poll_cancels = through == "poll"
    agent()
    pidfile = tmp_path / "child.pid"
    # Through the log: the script keeps printing, so log calls (and their answers) go on.
    loop = "while true; do echo tick; sleep 0.2; done" if through == "log" else "sleep 300"
    task_id = fake.submit(f'sleep 300 &\necho $! > "{pidfile}"\necho started\n{loop}\n')
    fake.wait_log(task_id, b"started\n")
    child = read_pid(pidfile)
    asked = time.monotonic()

    fake.cancel(task_id)

    task = fake.wait_ended(task_id, CANCEL_S)
    assert time.monotonic() - asked < CANCEL_S
    assert task.result["outcome"] == "cancelled"
    assert bytes(task.log).startswith(b"started\n")
    wait_until(lambda: pid_gone(child), CANCEL_S)


def test_files_are_written_in_the_task_directory(
    fake: FakeWorkerService, agent: Callable[..., AgentProcess]
) -> None:
    agent()
    files = {"a.txt": b64(b"alpha\n"), "deep/er/b.bin": b64(b"\x00\x01beta")}

    task = fake.wait_ended(fake.submit("cat a.txt; od -An -c deep/er/b.bin", files=files))

    assert task.result["exit_code"] == 0
    assert bytes(task.log).split() == [b"alpha", b"\\0", b"001", b"b", b"e", b"t", b"a"]


@pytest.mark.parametrize(
    "name",
    [
        "../escaped",
        "/tmp/escaped",
        "a/../../escaped",
        "a\\escaped",
        "C:/escaped",
        "a//escaped",
        "./escaped",
        "",
    ],
)
def test_file_paths_that_escape_are_refused(
    name: str, fake: FakeWorkerService, agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agent()
    marker = tmp_path / "ran"

    task = fake.wait_ended(fake.submit(f'touch "{marker}"', files={name: b64(b"x")}))

    assert task.result["outcome"] == "failed_to_start"
    assert task.result["exit_code"] is None and task.result["log_bytes"] == 0
    assert "file" in task.result["error"]
    assert not marker.exists()
    assert not list(tmp_path.rglob("escaped"))


def test_env_reaches_the_script_and_no_secret_reaches_it_or_the_log(
    fake: FakeWorkerService, agent: Callable[..., AgentProcess]
) -> None:
    process = agent()
    secret = "s3cr3t-value-8e1f"

    task = fake.wait_ended(
        fake.submit('printf "%s\\n" "$DEPLOY_KEY"; env', env={"DEPLOY_KEY": secret})
    )

    lines = bytes(task.log).decode().splitlines()
    assert lines[0] == secret
    for token in (WORKER_TOKEN, BOOTSTRAP_TOKEN):
        assert token not in bytes(task.log).decode()
    log = process.log()
    assert "task_ended" in log
    for value in (secret, WORKER_TOKEN, BOOTSTRAP_TOKEN):
        assert value not in log


def test_a_chunk_retried_after_a_503_or_a_lost_answer_is_not_duplicated(
    fake: FakeWorkerService, agent: Callable[..., AgentProcess]
) -> None:
    fake.fail_logs = 2  # 503 before storing
    fake.lose_log_answers = 2  # stored, then 503: the agent sends the same bytes again
    agent()
    script = "for i in 1 2 3 4 5 6; do echo line $i; sleep 0.2; done"

    task = fake.wait_ended(fake.submit(script))

    assert bytes(task.log) == b"".join(b"line %d\n" % i for i in range(1, 7))
    assert task.result["log_bytes"] == len(task.log)
    assert fake.fail_logs == 0 and fake.lose_log_answers == 0


def test_service_down_mid_task_then_back_on_the_same_port_gets_the_full_log(
    fake: FakeWorkerService, agent: Callable[..., AgentProcess]
) -> None:
    process = agent()
    script = "i=0; while [ $i -lt 60 ]; do i=$((i+1)); echo line $i; sleep 0.1; done"
    task_id = fake.submit(script)
    fake.wait_log(task_id, b"line 3\n")

    fake.stop()
    # An outage of a few seconds, a fixed length on purpose: output piles up meanwhile.
    time.sleep(3)
    fake.start()

    task = fake.wait_ended(task_id)
    assert bytes(task.log) == b"".join(b"line %d\n" % i for i in range(1, 61))
    assert task.result["outcome"] == "exited" and task.result["exit_code"] == 0
    assert "event=service_retry" in process.log()


def test_discard_stops_sending_and_the_script_runs_to_its_end(
    fake: FakeWorkerService, agent: Callable[..., AgentProcess]
) -> None:
    fake.log_limit = 1000
    process = agent()
    script = "head -c 3000000 /dev/zero | tr '\\000' 'b'; echo; echo done"

    task = fake.wait_ended(fake.submit(script))

    assert task.discarded and len(task.log) == 1000
    assert task.result["outcome"] == "exited" and task.result["exit_code"] == 0
    assert task.result["log_bytes"] == 3_000_000 + len("\ndone\n")
    assert task.finish_statuses == [200]
    # A few chunks at most: the agent stopped sending at the first discard.
    assert task.log_calls <= 4
    assert "event=task_log_discarded" in process.log()


def test_finish_answered_409_sends_the_rest_then_finishes_again(
    fake: FakeWorkerService, agent: Callable[..., AgentProcess]
) -> None:
    fake.refuse_logs = 1  # the first chunk is refused: the sender stops, the output is held
    agent()

    task = fake.wait_ended(fake.submit("printf 'one\\n'; sleep 0.5; printf 'two\\n'"))

    assert task.finish_statuses == [409, 200]
    assert bytes(task.log) == b"one\ntwo\n"
    assert task.finishes[0] == task.finishes[1]
    assert task.result["log_bytes"] == 8


def test_a_finished_task_handed_out_again_is_not_run_again(
    fake: FakeWorkerService, agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agent()
    marker = tmp_path / "runs"
    task_id = fake.submit(f'echo ran >> "{marker}"; echo output')
    task = fake.wait_ended(task_id)
    # The poll held now may still list the task as running; the next one gets it.
    fake.max_poll_wait_s = 0.5

    fake.redeliver(task_id)

    fake.wait_for(lambda: len(task.finishes) == 2 and task.state == "ended")
    assert task.deliveries == 2
    assert task.finishes[0] == task.finishes[1]
    assert marker.read_text() == "ran\n"
    assert bytes(task.log) == b"output\n"


def test_several_tasks_run_at_once(
    fake: FakeWorkerService, agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agent()
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    # Each task waits until all four have started: only concurrent tasks all get there.
    script = (
        'touch "{dir}/$N"\n'
        'while [ "$(ls "{dir}" | wc -l)" -lt 4 ]; do sleep 0.05; done\n'
        'echo "task $N"\n'
    ).replace("{dir}", str(barrier))

    ids = [fake.submit(script, env={"N": str(n)}, timeout_s=int(WAIT_S)) for n in range(4)]

    for n, task_id in enumerate(ids):
        task = fake.wait_ended(task_id)
        assert task.result["outcome"] == "exited", bytes(task.log)
        assert bytes(task.log) == f"task {n}\n".encode()


def test_without_a_worker_token_the_agent_serves_run_only(
    fake: FakeWorkerService, agent: Callable[..., AgentProcess]
) -> None:
    fake.give_worker_token = False

    process = agent()

    wait_until(lambda: "event=tasks_disabled" in process.log())
    assert fake.polls == []
    assert process.log().count("event=tasks_disabled") == 1


def test_401_on_poll_stops_polling_and_sigterm_still_exits_0(
    fake: FakeWorkerService, agent: Callable[..., AgentProcess]
) -> None:
    fake.poll_statuses = [401]

    process = agent()

    wait_until(lambda: "event=worker_revoked" in process.log())
    assert len(fake.polls) == 1
    assert process.stop() == 0


def test_sigterm_kills_running_tasks_and_exits_0(
    fake: FakeWorkerService, agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    process = agent()
    pidfile = tmp_path / "script.pid"
    task_id = fake.submit(f'echo $$ > "{pidfile}"; echo started; sleep 300')
    fake.wait_log(task_id, b"started\n")
    pid = read_pid(pidfile)

    assert process.stop() == 0

    wait_until(lambda: pid_gone(pid), CANCEL_S)
    assert "event=stopped exit_code=0" in process.log()


# -- the output buffer, in process ---------------------------------------------------


def load_agent() -> ModuleType:
    spec = importlib.util.spec_from_file_location("workerlease_agent_under_test", AGENT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_output_blocks_the_reader_beyond_8_mib_unsent_until_the_service_has_it() -> None:
    agent_module = load_agent()
    output = agent_module.Output()
    mib = b"x" * (1 << 20)
    appended: list[int] = []

    def reader() -> None:
        for _ in range(10):
            output.append(mib)
            appended.append(1)
        output.end()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    wait_until(lambda: len(appended) == 8)
    thread.join(0.3)  # it must still be blocked: nothing has been acknowledged
    assert thread.is_alive() and len(appended) == 8

    offset, chunk = output.next_chunk()
    assert offset == 0 and len(chunk) == 1 << 20
    assert output.acknowledge(3 << 20)

    thread.join(WAIT_S)
    assert len(appended) == 10 and output.total == 10 << 20
    offset, chunk = output.next_chunk()
    assert offset == 3 << 20 and len(chunk) == 1 << 20
    assert not output.acknowledge(1 << 20)  # before what it dropped: a gap


def test_sigterm_during_an_outage_does_not_hang(
    fake: FakeWorkerService, agent: Callable[..., AgentProcess]
) -> None:
    process = agent()
    task_id = fake.submit("while true; do echo tick; sleep 0.1; done")
    fake.wait_log(task_id, b"tick\n")
    fake.stop()

    assert process.stop() == 0
