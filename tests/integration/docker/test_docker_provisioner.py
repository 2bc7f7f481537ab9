"""The Docker provisioner against a real engine, with the real agent in the container."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import docker
import pytest

from provisioners.base import (
    LABEL_DEPLOYMENT,
    LABEL_POOL,
    LABEL_WORKER,
    PermanentProvisionerError,
    ResourceState,
    TransientProvisionerError,
    WorkerHandle,
    WorkerSpec,
)
from provisioners.docker import (
    DockerProvisioner,
    DockerUnavailableError,
    ImageNotFoundError,
    container_name,
    default_network_name,
)

pytestmark = [pytest.mark.integration, pytest.mark.docker]

POOL = "docker-test"  # the pool of every provisioner make_provisioner makes

MakeProvisioner = Callable[..., DockerProvisioner]
MakeSpec = Callable[..., WorkerSpec]


def _post_json(url: str, payload: dict[str, Any], token: str) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def _wait_state(
    provisioner: DockerProvisioner, handle: WorkerHandle, want: ResourceState, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while (state := provisioner.describe([handle])[handle.worker_id]) != want:
        assert time.monotonic() < deadline, f"still {state}, wanted {want}"
        time.sleep(0.2)


def _closed_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_created_worker_runs_labelled_and_its_agent_calls_back_and_runs_scripts(
    docker_engine: docker.DockerClient,
    make_provisioner: MakeProvisioner,
    make_spec: MakeSpec,
    fake_service: Any,
    deployment: str,
) -> None:
    spec = make_spec(deployment)
    handle = make_provisioner().create(spec)

    container = docker_engine.containers.get(handle.provider_id)
    assert container.name == container_name(spec.worker_id) == f"workerlease-{spec.worker_id}"
    assert container.labels[LABEL_DEPLOYMENT] == deployment
    assert container.labels[LABEL_POOL] == POOL
    assert container.labels[LABEL_WORKER] == spec.worker_id
    networks = container.attrs["NetworkSettings"]["Networks"]
    assert list(networks) == [default_network_name(deployment)]
    bridge_address = networks[default_network_name(deployment)]["IPAddress"]
    assert (handle.worker_id, handle.pool, handle.address) == (spec.worker_id, POOL, bridge_address)

    call = fake_service.wait_ready(spec.worker_id)
    assert call.authorization == f"Bearer {spec.bootstrap_token}"
    agent_url = call.body["agent_url"]
    assert urlsplit(agent_url).hostname == bridge_address  # reached on the bridge, not via a port
    assert container.attrs["HostConfig"]["PortBindings"] in (None, {})
    assert docker_engine.containers.get(handle.provider_id).status == "running"

    result = _post_json(
        f"{agent_url}/run",
        {"script": "echo hello from $WORKERLEASE_WORKER_ID", "timeout_s": 20},
        fake_service.access_token(spec.worker_id),
    )
    assert result["exit_code"] == 0
    assert result["stdout"].strip() == f"hello from {spec.worker_id}"
    assert result["timed_out"] is False


def test_containers_get_the_isolating_defaults_and_a_labelled_network_of_their_own(
    docker_engine: docker.DockerClient,
    make_provisioner: MakeProvisioner,
    make_spec: MakeSpec,
    fake_service: Any,
    deployment: str,
) -> None:
    spec = make_spec(deployment)
    handle = make_provisioner().create(spec)

    host = docker_engine.containers.get(handle.provider_id).attrs["HostConfig"]
    assert host["NetworkMode"] == default_network_name(deployment)
    assert (host["CapDrop"], host["SecurityOpt"], host["Privileged"]) == (
        ["ALL"],
        ["no-new-privileges"],
        False,
    )
    assert (host["PidsLimit"], host["Memory"], host["MemorySwap"], host["NanoCpus"]) == (
        512,
        1 << 30,
        1 << 30,
        10**9,
    )
    network = docker_engine.networks.get(default_network_name(deployment))
    assert network.attrs["Driver"] == "bridge"
    assert network.attrs["Labels"] == {LABEL_DEPLOYMENT: deployment}
    gateway = network.attrs["IPAM"]["Config"][0]["Gateway"]
    port = urlsplit(fake_service.url).port
    env = dict(
        item.split("=", 1)
        for item in docker_engine.containers.get(handle.provider_id).attrs["Config"]["Env"]
    )
    assert env["WORKERLEASE_URL"] == f"http://{gateway}:{port}"  # loopback -> the gateway
    fake_service.wait_ready(spec.worker_id)


def test_pool_options_name_the_network_its_subnet_the_service_url_and_the_limits(
    docker_engine: docker.DockerClient,
    make_provisioner: MakeProvisioner,
    make_spec: MakeSpec,
    fake_service: Any,
    deployment: str,
) -> None:
    # A subnet of 198.18.0.0/15 (benchmarking range): nothing on this machine uses it.
    subnet = f"198.18.{int(deployment[-2:], 16)}.0/24"
    gateway = subnet.replace(".0/24", ".1")
    provisioner = make_provisioner(
        network=f"{deployment}-net",
        subnet=subnet,
        service_url=f"http://{gateway}:{urlsplit(fake_service.url).port}",
        pids_limit=100,
        memory="256m",
        cpus=0.5,
        user="65534:65534",
    )
    spec = make_spec(deployment)
    handle = provisioner.create(spec)

    attrs = docker_engine.containers.get(handle.provider_id).attrs
    host = attrs["HostConfig"]
    assert host["NetworkMode"] == f"{deployment}-net"
    assert (host["PidsLimit"], host["Memory"], host["NanoCpus"]) == (100, 256 << 20, 5 * 10**8)
    assert attrs["Config"]["User"] == "65534:65534"
    network = docker_engine.networks.get(f"{deployment}-net")
    assert network.attrs["IPAM"]["Config"] == [{"Subnet": subnet, "Gateway": gateway}]
    assert network.attrs["Labels"] == {LABEL_DEPLOYMENT: deployment}
    call = fake_service.wait_ready(spec.worker_id)
    assert urlsplit(call.body["agent_url"]).hostname == handle.address


def test_creating_the_same_worker_twice_gives_one_container(
    docker_engine: docker.DockerClient,
    make_provisioner: MakeProvisioner,
    make_spec: MakeSpec,
    deployment: str,
) -> None:
    provisioner = make_provisioner()
    spec = make_spec(deployment)

    first = provisioner.create(spec)
    second = provisioner.create(spec)

    assert first == second
    owned = docker_engine.containers.list(
        all=True, filters={"label": f"{LABEL_DEPLOYMENT}={deployment}"}
    )
    assert [c.id for c in owned] == [first.provider_id]


def test_concurrent_creates_of_one_worker_give_one_container(
    make_provisioner: MakeProvisioner, make_spec: MakeSpec, deployment: str
) -> None:
    provisioner = make_provisioner()
    spec = make_spec(deployment)

    with ThreadPoolExecutor(4) as pool:
        handles = list(pool.map(lambda _: provisioner.create(spec), range(4)))

    assert len({h.provider_id for h in handles}) == 1
    assert [h.provider_id for h in provisioner.list_owned(deployment)] == [handles[0].provider_id]


def test_destroy_removes_the_container_and_succeeds_when_already_gone(
    docker_engine: docker.DockerClient,
    make_provisioner: MakeProvisioner,
    make_spec: MakeSpec,
    deployment: str,
) -> None:
    provisioner = make_provisioner()
    handle = provisioner.create(make_spec(deployment))

    provisioner.destroy(handle)
    provisioner.destroy(handle)

    with pytest.raises(docker.errors.NotFound):
        docker_engine.containers.get(handle.provider_id)
    assert provisioner.list_owned(deployment) == []
    assert provisioner.describe([handle]) == {handle.worker_id: ResourceState.GONE}


def test_describe_reports_running_workers_and_gone_for_unknown_ones(
    make_provisioner: MakeProvisioner, make_spec: MakeSpec, deployment: str
) -> None:
    provisioner = make_provisioner()
    handle = provisioner.create(make_spec(deployment))
    unknown = WorkerHandle(worker_id="w-never", pool=POOL, provider_id="0" * 64)

    states = provisioner.describe([handle, unknown])

    assert states == {handle.worker_id: ResourceState.RUNNING, "w-never": ResourceState.GONE}
    assert provisioner.describe([]) == {}


def test_list_owned_finds_only_this_deployments_containers_in_any_pool(
    make_provisioner: MakeProvisioner,
    make_spec: MakeSpec,
    new_deployment: Callable[[], str],
) -> None:
    mine, other = new_deployment(), new_deployment()
    provisioner = make_provisioner()
    a = provisioner.create(make_spec(mine))
    b = provisioner.create(make_spec(mine, pool="another-pool"))
    provisioner.create(make_spec(other))

    owned = provisioner.list_owned(mine)

    assert sorted(owned, key=lambda h: h.pool) == sorted(
        [a, WorkerHandle(b.worker_id, "another-pool", b.provider_id, b.address)],
        key=lambda h: h.pool,
    )


def test_exited_worker_is_gone_but_still_listed_until_destroyed(
    make_provisioner: MakeProvisioner, make_spec: MakeSpec, fake_service: Any, deployment: str
) -> None:
    # The fake service refuses this bootstrap token, so the agent exits on its own.
    provisioner = make_provisioner()
    handle = provisioner.create(make_spec(deployment, bootstrap_token=fake_service.refused_token))

    _wait_state(provisioner, handle, ResourceState.GONE)

    # An exited container has no address any more: compare what identifies it.
    assert [h.provider_id for h in provisioner.list_owned(deployment)] == [handle.provider_id]
    again = provisioner.create(make_spec(deployment, worker_id=handle.worker_id))
    assert (again.worker_id, again.provider_id, again.address) == (
        handle.worker_id,
        handle.provider_id,
        None,
    )
    provisioner.destroy(handle)
    assert provisioner.list_owned(deployment) == []


def test_unreachable_engine_is_a_transient_docker_unavailable_error(
    make_provisioner: MakeProvisioner, make_spec: MakeSpec, deployment: str
) -> None:
    provisioner = make_provisioner(docker_host=f"tcp://127.0.0.1:{_closed_loopback_port()}")
    handle = WorkerHandle(worker_id="w-x", pool=POOL, provider_id="abc")

    with pytest.raises(DockerUnavailableError) as caught:
        provisioner.create(make_spec(deployment))
    assert isinstance(caught.value, TransientProvisionerError)
    assert caught.value.__cause__ is not None
    for call in (
        lambda: provisioner.destroy(handle),
        lambda: provisioner.describe([handle]),
        lambda: provisioner.list_owned(deployment),
    ):
        with pytest.raises(DockerUnavailableError):
            call()


def test_missing_image_with_pull_never_is_a_permanent_image_not_found_error(
    make_provisioner: MakeProvisioner, make_spec: MakeSpec, deployment: str
) -> None:
    provisioner = make_provisioner(image="workerlease/no-such-image:0", pull="never")

    with pytest.raises(ImageNotFoundError) as caught:
        provisioner.create(make_spec(deployment))

    assert isinstance(caught.value, PermanentProvisionerError)
    assert "workerlease/no-such-image:0" in str(caught.value)
    assert provisioner.list_owned(deployment) == []


def test_missing_image_that_cannot_be_pulled_is_an_image_not_found_error(
    make_provisioner: MakeProvisioner, make_spec: MakeSpec, deployment: str
) -> None:
    # A registry on a closed loopback port: the pull fails without leaving the machine.
    image = f"127.0.0.1:{_closed_loopback_port()}/workerlease/nothing:0"
    provisioner = make_provisioner(image=image, pull="missing")

    with pytest.raises(ImageNotFoundError, match="pulling it failed"):
        provisioner.create(make_spec(deployment))
    assert provisioner.list_owned(deployment) == []
