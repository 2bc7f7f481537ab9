"""Fixtures of the local provisioner's tests: a fake service, a work root, specs."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from provisioners.base import WorkerSpec
from provisioners.local import LocalOptions, LocalProvisioner
from tests.integration.local.support import POOL, FakeService
from tests.support.server import worker_root


@pytest.fixture
def service() -> Iterator[FakeService]:
    fake = FakeService()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture
def work_root() -> Iterator[Path]:
    root = worker_root()
    yield root / "workers"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def deployment() -> str:
    return f"dep-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def provisioner(work_root: Path, deployment: str) -> Iterator[LocalProvisioner]:
    prov = LocalProvisioner(POOL, LocalOptions(work_root=str(work_root)))
    yield prov
    for handle in prov.list_owned(deployment):
        prov.destroy(handle)


@pytest.fixture
def spec(service: FakeService, deployment: str) -> Callable[..., WorkerSpec]:
    def make(worker_id: str | None = None, deployment_id: str = deployment) -> WorkerSpec:
        return WorkerSpec(
            worker_id=worker_id or f"w-{uuid.uuid4().hex[:8]}",
            pool=POOL,
            os="linux",
            deployment_id=deployment_id,
            service_url=service.url,
            bootstrap_token="bootstrap-secret",
        )

    return make
