"""Fixtures for the EC2 provisioner against moto's server mode.

One ``moto_server`` process per session on a free 127.0.0.1 port, started before
any boto3 client exists, with dummy credentials that can never reach AWS. Tests
share its state and keep apart by using their own deployment id.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

MOTO_STARTUP_TIMEOUT_S = 120.0  # a hang bound: moto's imports alone take seconds under load
REGION = "us-east-1"
# How late a thread may record its call after the limiter let it go. The limiter spaces
# the k-th and (k+2)-th RunInstances 1.05 s apart; the time a test records is taken after
# that, and on a loaded 2-core machine a thread woke >50 ms late. Without a limiter the
# 50 calls come in bursts a few ms apart, so this slack still catches one.
SCHEDULING_SLACK_S = 0.5


def assert_at_most_two_per_second(times: list[float]) -> None:
    """No three calls inside one second (so no 1-second window holds more than two), up to
    the threads' scheduling delay; and over the whole run no more than 2 per second."""
    times = sorted(times)
    tightest = min(later - earlier for earlier, later in zip(times, times[2:], strict=False))
    assert tightest >= 1.0 - SCHEDULING_SLACK_S, f"3 RunInstances calls within {tightest:.3f}s"
    # The rate over the whole run, where only the first call's delay counts: n calls at
    # 2 per 1.05 s span at least (n - 1) // 2 * 1.05 s.
    span = times[-1] - times[0]
    least = (len(times) - 1) // 2 * 1.0
    assert span >= least, f"{len(times)} RunInstances calls in {span:.2f}s (< {least:.0f}s)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def aws_env() -> Iterator[None]:
    """Dummy credentials, no profile, no IMDS: nothing here can reach a real account."""
    with pytest.MonkeyPatch.context() as mp:
        for name in (
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_EC2",
        ):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/workerlease-test")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/workerlease-test")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@pytest.fixture(scope="session")
def moto_endpoint(aws_env: None) -> Iterator[str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # AMI validation makes RunInstances refuse unknown images, as EC2 does.
    env = {**os.environ, "MOTO_ENABLE_AMI_VALIDATION": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + MOTO_STARTUP_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {url}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def ec2(moto_endpoint: str) -> Any:
    """The test's own client (no rate limiting), for setup and for checking results."""
    import boto3

    return boto3.client("ec2", region_name=REGION, endpoint_url=moto_endpoint)


@pytest.fixture(scope="session")
def images(ec2: Any) -> dict[str, str]:
    """An Ubuntu and a Windows AMI from moto's built-in catalogue."""
    found = ec2.describe_images(Owners=["amazon"])["Images"]
    ubuntu = next(i for i in found if i["Name"].startswith("ubuntu/images/"))
    windows = next(i for i in found if i.get("Platform") == "windows")
    return {"ubuntu": ubuntu["ImageId"], "windows": windows["ImageId"]}


@pytest.fixture(scope="session")
def network(ec2: Any) -> dict[str, Any]:
    """A VPC with one subnet in each of two AZs and a worker security group."""
    vpc_id = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc_id, CidrBlock=f"10.42.{n}.0/24", AvailabilityZone=az)["Subnet"][
            "SubnetId"
        ]
        for n, az in enumerate((f"{REGION}a", f"{REGION}b"))
    ]
    sg = ec2.create_security_group(
        GroupName=f"workers-{uuid.uuid4().hex[:8]}", Description="workers", VpcId=vpc_id
    )["GroupId"]
    return {"vpc_id": vpc_id, "subnet_ids": subnets, "security_group_id": sg}


@pytest.fixture
def deployment_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_provisioner(
    moto_endpoint: str, images: dict[str, str], network: dict[str, Any]
) -> Iterator[Callable[..., Any]]:
    """Build EC2Provisioners with test defaults; ``**overrides`` replace options."""
    from provisioners.ec2 import EC2Options, EC2Provisioner

    made: list[EC2Provisioner] = []

    def make(pool: str = "hosted-ubuntu", **overrides: Any) -> EC2Provisioner:
        options: dict[str, Any] = {
            "region": REGION,
            "endpoint_url": moto_endpoint,
            "image_id": images["ubuntu"],
            "instance_types": ["t3.micro"],
            "subnet_ids": network["subnet_ids"],
            "security_group_ids": [network["security_group_id"]],
            "max_attempts": 2,
        }
        options.update(overrides)
        provisioner = EC2Provisioner(pool, EC2Options.model_validate(options))
        made.append(provisioner)
        return provisioner

    yield make
    for provisioner in made:
        provisioner.close()


@pytest.fixture
def make_spec(deployment_id: str) -> Callable[..., Any]:
    from provisioners.base import WorkerSpec

    def make(worker_id: str | None = None, **fields: Any) -> WorkerSpec:
        values: dict[str, Any] = {
            "worker_id": worker_id or f"w-{uuid.uuid4().hex[:12]}",
            "pool": "hosted-ubuntu",
            "os": "ubuntu",
            "deployment_id": deployment_id,
            "service_url": "https://workerlease.example.internal",
            "bootstrap_token": f"boot-{uuid.uuid4().hex}",
        }
        values.update(fields)
        return WorkerSpec(**values)

    return make
