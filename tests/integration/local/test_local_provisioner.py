"""The local provisioner against real agent processes and a fake service on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from provisioners.base import ResourceState, WorkerHandle, WorkerSpec
from provisioners.local import AGENT_FILE, LocalOptions, LocalProvisioner
from tests.integration.local.support import POOL, FakeService, alive, wait_for

pytestmark = pytest.mark.integration


def test_create_starts_the_agent_in_its_own_dir_and_session(
    provisioner: LocalProvisioner,
    service: FakeService,
    spec: Callable[..., WorkerSpec],
    work_root: Path,
    deployment: str,
) -> None:
    worker = spec()

    handle = provisioner.create(worker)

    pid = int(handle.provider_id)
    workdir = work_root / deployment / worker.worker_id
    assert handle == WorkerHandle(worker.worker_id, POOL, str(pid), "127.0.0.1")
    assert Path(f"/proc/{pid}/cwd").resolve() == workdir.resolve()
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o700
    assert os.getpgid(pid) == pid  # its own group, so destroy can kill it whole
    agent_url = service.agent_url(worker.worker_id)
    assert service.calls[worker.worker_id][0]["address"] == "127.0.0.1"
    assert requests.get(f"{agent_url}/healthz", timeout=5).json() == {"status": "ok"}
    assert service.run(worker.worker_id, "pwd")["stdout"].strip() == str(workdir.resolve())


def test_create_again_returns_the_running_agent_and_starts_nothing(
    provisioner: LocalProvisioner,
    service: FakeService,
    spec: Callable[..., WorkerSpec],
    deployment: str,
) -> None:
    worker = spec()
    first = provisioner.create(worker)
    service.agent_url(worker.worker_id)

    second = provisioner.create(worker)

    assert second == first
    # /proc is the proof: a second agent would be listed from the moment it was started.
    assert [h.provider_id for h in provisioner.list_owned(deployment)] == [first.provider_id]
    assert len(service.calls[worker.worker_id]) == 1


def test_describe_is_running_until_destroyed(
    provisioner: LocalProvisioner, spec: Callable[..., WorkerSpec]
) -> None:
    handle = provisioner.create(spec())
    never = WorkerHandle("w-never-created", POOL, "999999")

    assert provisioner.describe([handle, never]) == {
        handle.worker_id: ResourceState.RUNNING,
        never.worker_id: ResourceState.GONE,
    }
    provisioner.destroy(handle)
    assert provisioner.describe([handle]) == {handle.worker_id: ResourceState.GONE}


def test_destroy_kills_the_agent_and_script_children_and_removes_the_dir(
    provisioner: LocalProvisioner,
    service: FakeService,
    spec: Callable[..., WorkerSpec],
    work_root: Path,
    deployment: str,
) -> None:
    worker = spec()
    handle = provisioner.create(worker)
    child = int(service.run(worker.worker_id, "sleep 300 >/dev/null 2>&1 &\necho $!")["stdout"])
    assert alive(child)

    provisioner.destroy(handle)

    assert not alive(int(handle.provider_id))
    assert not alive(child)
    assert not (work_root / deployment / worker.worker_id).exists()
    assert provisioner.list_owned(deployment) == []
    provisioner.destroy(handle)  # already gone: still fine


def test_destroy_escalates_to_sigkill(
    provisioner: LocalProvisioner, service: FakeService, spec: Callable[..., WorkerSpec]
) -> None:
    worker = spec()
    handle = provisioner.create(worker)
    stubborn = "trap '' TERM\nsleep 300 >/dev/null 2>&1 &\necho $!"
    child = int(service.run(worker.worker_id, stubborn)["stdout"])

    provisioner.destroy(handle)

    assert not alive(child)


def test_destroy_many_stops_a_batch_with_one_wait_and_leaves_others_alone(
    provisioner: LocalProvisioner,
    service: FakeService,
    spec: Callable[..., WorkerSpec],
    work_root: Path,
    deployment: str,
) -> None:
    workers = [spec() for _ in range(4)]
    handles = [provisioner.create(worker) for worker in workers]
    children = {
        w.worker_id: int(service.run(w.worker_id, "sleep 300 >/dev/null 2>&1 &\necho $!")["stdout"])
        for w in workers
    }
    # One worker ignores SIGTERM: the batch escalates to SIGKILL and still ends every one.
    stubborn = workers[0].worker_id
    children[stubborn] = int(
        service.run(stubborn, "trap '' TERM\nsleep 300 >/dev/null 2>&1 &\necho $!")["stdout"]
    )
    kept = handles.pop()

    results = provisioner.destroy_many(handles)

    assert results == {h.worker_id: None for h in handles}
    for handle in handles:
        assert not alive(int(handle.provider_id))
        assert not alive(children[handle.worker_id])
        assert not (work_root / deployment / handle.worker_id).exists()
    assert alive(int(kept.provider_id)) and alive(children[kept.worker_id])
    assert [h.worker_id for h in provisioner.list_owned(deployment)] == [kept.worker_id]
    assert provisioner.destroy_many(handles) == {h.worker_id: None for h in handles}  # again


def test_agent_that_exits_is_reaped_and_gone(
    provisioner: LocalProvisioner, service: FakeService, spec: Callable[..., WorkerSpec]
) -> None:
    service.status = 409  # the service refuses the worker: the agent exits 1
    handle = provisioner.create(spec())
    pid = int(handle.provider_id)

    wait_for(lambda: provisioner.describe([handle])[handle.worker_id] == ResourceState.GONE)

    wait_for(lambda: not Path(f"/proc/{pid}").exists())  # reaped, not left a zombie


def test_list_owned_finds_agents_of_a_previous_provisioner_only_in_its_deployment(
    work_root: Path, spec: Callable[..., WorkerSpec], deployment: str
) -> None:
    before_crash = LocalProvisioner(POOL, LocalOptions(work_root=str(work_root)))
    other_deployment = f"{deployment}-other"
    mine = before_crash.create(spec())
    theirs = before_crash.create(spec(deployment_id=other_deployment))
    try:
        after_restart = LocalProvisioner("pool-b", LocalOptions(work_root=str(work_root)))

        owned = after_restart.list_owned(deployment)

        assert owned == [mine]
        assert [h.worker_id for h in after_restart.list_owned(other_deployment)] == [
            theirs.worker_id
        ]
        after_restart.destroy(owned[0])
        assert before_crash.describe([mine, theirs]) == {
            mine.worker_id: ResourceState.GONE,
            theirs.worker_id: ResourceState.RUNNING,
        }
    finally:
        before_crash.destroy(mine)
        before_crash.destroy(theirs)


def test_agent_of_another_provisioner_is_not_owned(
    provisioner: LocalProvisioner, service: FakeService, deployment: str, tmp_path: Path
) -> None:
    """An agent without the local marker (as a Docker container's, seen in /proc) is ignored."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "WORKERLEASE_URL": service.url,
        "WORKERLEASE_WORKER_ID": "w-container",
        "WORKERLEASE_DEPLOYMENT": deployment,
        "WORKERLEASE_POOL": POOL,
        "WORKERLEASE_BOOTSTRAP_TOKEN": "bootstrap-secret",
    }
    proc = subprocess.Popen(
        [sys.executable, str(AGENT_FILE)],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        service.agent_url("w-container")

        assert provisioner.list_owned(deployment) == []
        provisioner.destroy(WorkerHandle("w-container", POOL, str(proc.pid)))
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_concurrent_creates_of_one_worker_start_one_agent(
    provisioner: LocalProvisioner, spec: Callable[..., WorkerSpec], deployment: str
) -> None:
    worker = spec()
    handles: list[WorkerHandle] = []

    threads = [
        threading.Thread(target=lambda: handles.append(provisioner.create(worker)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert len(handles) == 8 and len(set(handles)) == 1
    assert provisioner.list_owned(deployment) == [handles[0]]


def test_create_after_the_agent_died_starts_a_fresh_one_in_a_fresh_dir(
    provisioner: LocalProvisioner,
    service: FakeService,
    spec: Callable[..., WorkerSpec],
    work_root: Path,
    deployment: str,
) -> None:
    worker = spec()
    first = provisioner.create(worker)
    service.run(worker.worker_id, "touch stale")
    os.kill(int(first.provider_id), signal.SIGKILL)
    wait_for(lambda: provisioner.describe([first])[worker.worker_id] == ResourceState.GONE)

    second = provisioner.create(worker)

    assert second.provider_id != first.provider_id
    wait_for(lambda: len(service.calls[worker.worker_id]) == 2)
    assert not (work_root / deployment / worker.worker_id / "stale").exists()
