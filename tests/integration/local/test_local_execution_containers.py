"""Local pools with the execution-containers capability: their workers use the host's
Docker engine (its socket's group is a supplementary group of the worker's uid), and
the provisioner's warning says loudly that such a pool gives up isolation. Workers of
pools without the capability keep no access to the engine."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from images.build import ImageBuildError, build_image
from provisioners.base import EXECUTION_CONTAINERS, WorkerSpec
from provisioners.local import LocalProvisioner
from tests.integration.local.support import POOL
from tests.support.worker_service import FakeWorkerService

pytestmark = [pytest.mark.integration, pytest.mark.docker]

WAIT_S = 120.0  # bounds a hang only


@pytest.fixture(scope="module")
def testing_tag() -> str:
    info = subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False)
    if info.returncode != 0:
        pytest.fail("no Docker engine; run .ci/ensure-docker", pytrace=False)
    try:
        return build_image("testing")
    except ImageBuildError as exc:
        pytest.fail(f"cannot build images/testing: {exc}", pytrace=False)


@pytest.fixture
def worker(
    provisioner: LocalProvisioner, deployment: str
) -> Iterator[Callable[..., FakeWorkerService]]:
    """``worker(capabilities)``: a local worker whose agent polls a fake service of its own."""
    fakes: list[FakeWorkerService] = []

    def start(capabilities: tuple[str, ...]) -> FakeWorkerService:
        fake = FakeWorkerService(worker_id=f"w-{uuid.uuid4().hex[:8]}").start()
        fakes.append(fake)
        provisioner.create(
            WorkerSpec(
                worker_id=fake.worker_id,
                pool=POOL,
                os="ubuntu",
                deployment_id=deployment,
                service_url=fake.url,
                bootstrap_token="bootstrap-secret",
                capabilities=capabilities,
            )
        )
        fake.wait_for(lambda: fake.polls != [], WAIT_S)
        return fake

    yield start
    for fake in fakes:
        fake.stop()


def uid_of_agent(work_root: Path, deployment: str, worker_id: str) -> int:
    return (work_root / deployment / worker_id).stat().st_uid


def test_a_container_task_runs_on_the_host_engine_and_the_pool_warns(
    provisioner: LocalProvisioner,
    worker: Callable[..., FakeWorkerService],
    testing_tag: str,
    work_root: Path,
    deployment: str,
) -> None:
    assert provisioner.isolated, "these tests run as root, where workers have uids of their own"
    assert provisioner.warning is None
    fake = worker((EXECUTION_CONTAINERS,))
    script = 'echo "$WHO" > out.txt; cat out.txt; id -u; test -w /workspace && echo writable'

    task = fake.wait_ended(
        fake.submit(script, container={"image": testing_tag}, env={"WHO": "container"}), WAIT_S
    )

    uid = uid_of_agent(work_root, deployment, fake.worker_id)
    assert task.result["outcome"] == "exited", bytes(task.log)
    assert bytes(task.log) == f"container\n{uid}\nwritable\n".encode()
    warning = provisioner.warning or ""
    assert f"POOL {POOL} GIVES UP WORKER ISOLATION" in warning
    assert "root on the host" in warning


def test_a_pool_without_the_capability_has_no_engine_and_no_warning(
    provisioner: LocalProvisioner, worker: Callable[..., FakeWorkerService], testing_tag: str
) -> None:
    fake = worker(())

    task = fake.wait_ended(
        fake.submit("echo start; docker version --format '{{.Server.Version}}'"), WAIT_S
    )

    assert task.result["outcome"] == "exited" and task.result["exit_code"] != 0
    assert b"permission denied" in bytes(task.log)
    assert provisioner.warning is None


def test_the_pool_warns_at_start_before_its_first_worker(provisioner: LocalProvisioner) -> None:
    """The service hands the pool's capabilities over when it builds the provisioner, so
    the warning is in the log and in /v1/admin/pools before any worker exists."""
    provisioner.capabilities = frozenset({EXECUTION_CONTAINERS})
    assert f"POOL {POOL} GIVES UP WORKER ISOLATION" in (provisioner.warning or "")
