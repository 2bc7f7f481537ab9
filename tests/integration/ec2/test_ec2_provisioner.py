"""EC2Provisioner against moto's EC2 server: ownership, idempotency, capacity, throttling."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs

import pytest
from botocore.awsrequest import AWSResponse

from provisioners.base import (
    CapacityError,
    PermanentProvisionerError,
    ResourceState,
    TransientProvisionerError,
    WorkerHandle,
)
from provisioners.ec2 import (
    TAG_DEPLOYMENT,
    TAG_POOL,
    TAG_WORKER,
    EC2Options,
    RateLimiter,
    client_token,
)
from tests.integration.ec2.conftest import assert_at_most_two_per_second

pytestmark = [pytest.mark.aws, pytest.mark.integration]


def instances_tagged(ec2: Any, key: str, value: str) -> list[dict[str, Any]]:
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": f"tag:{key}", "Values": [value]}]
    )
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def instance(ec2: Any, instance_id: str) -> dict[str, Any]:
    reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return dict(reservations[0]["Instances"][0])


def user_data(ec2: Any, instance_id: str) -> str:
    value = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(value["UserData"]["Value"]).decode()


def fail_run_instances(
    client: Any, code: str, when: Callable[[dict[str, Any]], bool], status: int = 500
) -> list[dict[str, Any]]:
    """Make RunInstances calls for which ``when(params)`` holds fail with ``code``.

    A ``before-call`` handler that returns a response short-circuits botocore's
    HTTP request; the failed calls' parameters are recorded and returned.
    """
    failed: list[dict[str, Any]] = []

    def handler(params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        body = params["body"]
        if not when(body):
            return None
        failed.append(body)
        error = {"Error": {"Code": code, "Message": f"injected {code}"}}
        return AWSResponse("", status, {}, None), {**error, "ResponseMetadata": {}}

    client.meta.events.register("before-call.ec2.RunInstances", handler)
    return failed


def count_calls(client: Any, operation: str) -> list[float]:
    """Record the monotonic time of each ``operation`` request the client sends.

    ``before-send`` fires once per HTTP attempt, botocore's retries included, after
    the provisioner's rate limiter (registered first on the same event) let it go.
    """
    times: list[float] = []
    lock = threading.Lock()

    def handler(**_: Any) -> None:
        with lock:
            times.append(time.monotonic())

    client.meta.events.register(f"before-send.ec2.{operation}", handler)
    return times


def test_create_launches_tagged_imdsv2_instance_with_bootstrap_token_only(
    ec2, make_provisioner, make_spec
):
    provisioner = make_provisioner(root_volume_gb=40, tags={"team": "ci"})
    spec = make_spec()

    handle = provisioner.create(spec)

    found = instance(ec2, handle.provider_id)
    tags = {t["Key"]: t["Value"] for t in found["Tags"]}
    assert tags[TAG_DEPLOYMENT] == spec.deployment_id
    assert tags[TAG_POOL] == spec.pool
    assert tags[TAG_WORKER] == spec.worker_id
    assert tags["Name"] == f"workerlease-{spec.worker_id}"
    assert tags["team"] == "ci"
    assert found["MetadataOptions"]["HttpTokens"] == "required"
    assert found["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    assert handle == WorkerHandle(
        spec.worker_id, spec.pool, found["InstanceId"], found["PrivateIpAddress"]
    )
    volumes = ec2.describe_volumes(
        Filters=[{"Name": f"tag:{TAG_WORKER}", "Values": [spec.worker_id]}]
    )["Volumes"]
    assert len(volumes) == 1

    script = user_data(ec2, handle.provider_id)
    assert script.startswith("#!/bin/bash")
    assert f"export WORKERLEASE_BOOTSTRAP_TOKEN={spec.bootstrap_token}" in script
    assert "ACCESS_TOKEN" not in script
    assert "export WORKERLEASE_AGENT_HOST=0.0.0.0" in script
    assert "sh install.sh --service" in script
    # The agent is fetched from the service, pinned to this version's bytes.
    agent = files("images.agent").joinpath("workerlease_agent.py").read_bytes()
    assert f"fetch workerlease_agent.py {hashlib.sha256(agent).hexdigest()}" in script
    assert len(script.encode()) < 16384


def test_windows_pool_gets_powershell_user_data(ec2, make_provisioner, make_spec, images):
    provisioner = make_provisioner(pool="hosted-windows", image_id=images["windows"])
    spec = make_spec(pool="hosted-windows", os="windows")

    handle = provisioner.create(spec)

    script = user_data(ec2, handle.provider_id)
    assert script.startswith("<powershell>") and script.rstrip().endswith("</powershell>")
    assert f"$env:WORKERLEASE_BOOTSTRAP_TOKEN = '{spec.bootstrap_token}'" in script
    assert "-File (Join-Path $stage 'install.ps1')" in script


def test_create_again_after_crash_returns_the_same_instance(ec2, make_provisioner, make_spec):
    spec = make_spec()
    first = make_provisioner().create(spec)
    # A new process (no in-memory state) retries the same worker after a crash.
    second = make_provisioner().create(spec)

    assert second == first
    assert len(instances_tagged(ec2, TAG_WORKER, spec.worker_id)) == 1


def test_capacity_error_in_first_subnet_falls_back_to_second(
    ec2, make_provisioner, make_spec, network
):
    first_subnet, second_subnet = network["subnet_ids"]
    provisioner = make_provisioner()
    failed = fail_run_instances(
        provisioner.client(),
        "InsufficientInstanceCapacity",
        lambda body: body.get("SubnetId") == first_subnet,
    )

    handle = provisioner.create(make_spec())

    assert [body["SubnetId"] for body in failed] == [first_subnet]
    assert instance(ec2, handle.provider_id)["SubnetId"] == second_subnet


def test_spot_then_on_demand_tries_every_spot_placement_first(ec2, make_provisioner, make_spec):
    provisioner = make_provisioner(
        market="spot-then-on-demand", instance_types=["c7i.large", "m7i.large"]
    )
    failed = fail_run_instances(
        provisioner.client(),
        "InsufficientInstanceCapacity",
        lambda body: "InstanceMarketOptions.MarketType" in body,
    )

    handle = provisioner.create(make_spec())

    assert len(failed) == 4  # 2 types x 2 subnets, all spot
    launched = instance(ec2, handle.provider_id)
    assert launched["InstanceType"] == "c7i.large"
    assert "InstanceLifecycle" not in launched  # on-demand


def test_no_capacity_anywhere_raises_capacity_error_naming_each_attempt(
    ec2, make_provisioner, make_spec, network
):
    provisioner = make_provisioner(instance_types=["c7i.large", "m7i.large"])
    fail_run_instances(provisioner.client(), "InsufficientInstanceCapacity", lambda body: True)
    spec = make_spec()

    with pytest.raises(CapacityError) as raised:
        provisioner.create(spec)

    message = str(raised.value)
    for instance_type in ("c7i.large", "m7i.large"):
        for subnet in network["subnet_ids"]:
            assert f"on-demand/{instance_type}/{subnet}: InsufficientInstanceCapacity" in message
    assert raised.value.__cause__ is not None
    assert instances_tagged(ec2, TAG_WORKER, spec.worker_id) == []


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("UnauthorizedOperation", 403, PermanentProvisionerError),
        ("InvalidParameterValue", 400, PermanentProvisionerError),
        ("RequestLimitExceeded", 503, TransientProvisionerError),
        ("InternalError", 500, TransientProvisionerError),
    ],
)
def test_errors_are_translated_without_trying_other_placements(
    make_provisioner, make_spec, code, status, expected
):
    provisioner = make_provisioner()
    failed = fail_run_instances(provisioner.client(), code, lambda body: True, status=status)

    with pytest.raises(expected) as raised:
        provisioner.create(make_spec())

    assert not isinstance(raised.value, CapacityError)
    assert code in str(raised.value) and raised.value.__cause__ is not None
    assert len(failed) == 1


def test_unknown_image_is_a_permanent_error(make_provisioner, make_spec):
    provisioner = make_provisioner(image_id="ami-00000000000000000")
    with pytest.raises(PermanentProvisionerError, match="InvalidAMIID"):
        provisioner.create(make_spec())


def test_destroy_terminates_and_succeeds_again_when_gone(ec2, make_provisioner, make_spec):
    provisioner = make_provisioner()
    handle = provisioner.create(make_spec())

    provisioner.destroy(handle)
    provisioner.destroy(handle)
    provisioner.destroy(WorkerHandle("never", "hosted-ubuntu", "i-0123456789abcdef0"))

    assert instance(ec2, handle.provider_id)["State"]["Name"] == "terminated"
    assert provisioner.describe([handle]) == {handle.worker_id: ResourceState.GONE}


def test_destroy_many_terminates_1000_orphans_in_a_few_calls(
    ec2, make_provisioner, deployment_id, images
):
    launched = ec2.run_instances(
        ImageId=images["ubuntu"],
        MinCount=1000,
        MaxCount=1000,
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": TAG_DEPLOYMENT, "Value": deployment_id}]}
        ],
    )["Instances"]
    handles = [
        WorkerHandle(f"orphan-{n}", "hosted-ubuntu", i["InstanceId"])
        for n, i in enumerate(launched)
    ]
    # Two ids EC2 never knew, in the middle of the batch: the partial-failure path.
    handles[500:500] = [
        WorkerHandle("ghost-1", "hosted-ubuntu", "i-0aaaaaaaaaaaaaaa1"),
        WorkerHandle("ghost-2", "hosted-ubuntu", "i-0aaaaaaaaaaaaaaa2"),
    ]
    provisioner = make_provisioner()
    calls = count_calls(provisioner.client(), "TerminateInstances")

    results = provisioner.destroy_many(handles)

    assert results == {h.worker_id: None for h in handles}
    assert len(calls) <= 3  # 1002 ids: 1000 + 2, then the 2 ghosts dropped and the batch retried
    assert provisioner.list_owned(deployment_id) == []
    states = {i["State"]["Name"] for i in instances_tagged(ec2, TAG_DEPLOYMENT, deployment_id)}
    assert states == {"terminated"}


def test_describe_maps_instance_states(ec2, make_provisioner, make_spec):
    provisioner = make_provisioner()
    running, stopped, terminated = (provisioner.create(make_spec()) for _ in range(3))
    ec2.stop_instances(InstanceIds=[stopped.provider_id])
    ec2.terminate_instances(InstanceIds=[terminated.provider_id])
    missing = WorkerHandle("missing", "hosted-ubuntu", "i-0bbbbbbbbbbbbbbb1")

    states = provisioner.describe([running, stopped, terminated, missing])

    assert states == {
        running.worker_id: ResourceState.RUNNING,
        stopped.worker_id: ResourceState.GONE,
        terminated.worker_id: ResourceState.GONE,
        missing.worker_id: ResourceState.GONE,
    }


def test_list_owned_ignores_other_deployments_and_terminated_instances(
    ec2, make_provisioner, make_spec, deployment_id
):
    provisioner = make_provisioner()
    live = provisioner.create(make_spec())
    stopped = provisioner.create(make_spec())
    gone = provisioner.create(make_spec())
    ec2.stop_instances(InstanceIds=[stopped.provider_id])
    provisioner.destroy(gone)
    other = provisioner.create(make_spec(deployment_id="someone-else"))

    owned = provisioner.list_owned(deployment_id)

    assert sorted(owned, key=lambda h: h.worker_id) == sorted(
        [live, stopped], key=lambda h: h.worker_id
    )
    assert other.worker_id not in {h.worker_id for h in owned}


def test_concurrent_creates_never_exceed_two_run_instances_per_second(
    ec2, make_provisioner, make_spec, deployment_id
):
    provisioner = make_provisioner()
    starts = count_calls(provisioner.client(), "RunInstances")
    specs = [make_spec() for _ in range(50)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        handles = list(pool.map(provisioner.create, specs))

    assert len({h.provider_id for h in handles}) == 50
    # 50, or more when moto's server broke on concurrent launches in one subnet (an HTML
    # 500, "generator already executing") and the provisioner sent that launch again:
    # every attempt is one send that waited at the limiter, checked below.
    assert len(starts) >= 50
    assert_at_most_two_per_second(starts)
    assert len(provisioner.list_owned(deployment_id)) == 50


class _ThrottlingEC2(ThreadingHTTPServer):
    """An EC2 endpoint on 127.0.0.1 that finds no instances and throttles every launch."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ThrottlingHandler)
        self.launch_requests = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ThrottlingHandler(BaseHTTPRequestHandler):
    server: _ThrottlingEC2
    NS = "http://ec2.amazonaws.com/doc/2016-11-15/"

    def do_POST(self) -> None:
        form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
        if form["Action"] == ["RunInstances"]:
            self.server.launch_requests += 1
            status, body = (
                503,
                (
                    "<Response><Errors><Error><Code>RequestLimitExceeded</Code>"
                    "<Message>Request limit exceeded.</Message></Error></Errors>"
                    "<RequestID>r</RequestID></Response>"
                ),
            )
        else:  # DescribeInstances: nothing launched yet
            status, body = (
                200,
                (
                    f'<DescribeInstancesResponse xmlns="{self.NS}"><requestId>r</requestId>'
                    "<reservationSet/></DescribeInstancesResponse>"
                ),
            )
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: Any) -> None:
        pass


def test_botocore_retries_pass_the_rate_limiter_too(make_provisioner, make_spec, monkeypatch):
    server = _ThrottlingEC2()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    turns: list[str] = []
    original = RateLimiter.acquire

    def counted(limiter: RateLimiter, max_wait: float) -> None:
        turns.append("run" if limiter.calls == 2 else "other")
        original(limiter, max_wait)

    monkeypatch.setattr(RateLimiter, "acquire", counted)
    try:
        provisioner = make_provisioner(endpoint_url=server.url, max_attempts=3)
        with pytest.raises(TransientProvisionerError, match="RequestLimitExceeded"):
            provisioner.create(make_spec())
    finally:
        server.shutdown()
        server.server_close()

    assert server.launch_requests == 4  # the call and botocore's three retries...
    assert turns.count("run") == 4  # ...each waited for its turn at the limiter


class _GarblingHandler(_ThrottlingHandler):
    """The first answer is an HTML 500 page (as moto's web server gives when it breaks,
    or a proxy in front of EC2), the rest are EC2's."""

    def do_POST(self) -> None:
        self.server.launch_requests += 1
        if self.server.launch_requests > 1:
            super().do_POST()
            return
        self.rfile.read(int(self.headers["Content-Length"]))
        data = b"<!doctype html>\n<title>500 Internal Server Error</title>\n"
        self.send_response(500)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_an_answer_that_is_not_ec2s_xml_is_retried(make_provisioner, deployment_id):
    server = _ThrottlingEC2()
    server.RequestHandlerClass = _GarblingHandler
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        provisioner = make_provisioner(endpoint_url=server.url, max_attempts=1)
        assert provisioner.list_owned(deployment_id) == []
    finally:
        server.shutdown()
        server.server_close()
    assert server.launch_requests == 2  # the garbled answer, then the one that parsed


def test_rate_limiter_refuses_a_wait_beyond_the_bound():
    now = [0.0]
    limiter = RateLimiter(
        2, 1.0, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)
    )
    limiter.acquire(max_wait=5)
    limiter.acquire(max_wait=5)
    limiter.acquire(max_wait=5)  # waits one period
    assert now[0] == pytest.approx(1.0)
    limiter.acquire(max_wait=5)
    with pytest.raises(TransientProvisionerError, match="rate limit"):
        limiter.acquire(max_wait=0.5)


def test_options_refuse_ambiguous_or_reserved_settings():
    base = {"region": "us-east-1", "instance_types": ["t3.micro"]}
    with pytest.raises(ValueError, match="image_id, launch_template"):
        EC2Options.model_validate(base)
    with pytest.raises(ValueError, match="reserved"):
        EC2Options.model_validate({**base, "image_id": "ami-1", "tags": {"workerlease:pool": "x"}})
    with pytest.raises(ValueError, match="exactly one"):
        EC2Options.model_validate({**base, "launch_template": {"id": "lt-1", "name": "n"}})
    with pytest.raises(ValueError, match=r"unknown|Extra"):
        EC2Options.model_validate({**base, "image_id": "ami-1", "colour": "blue"})
    assert EC2Options.model_validate({"region": "r", "launch_template": {"name": "n"}})


def test_client_tokens_are_stable_distinct_per_placement_and_short():
    long_id = "w" * 80
    token = client_token(long_id, "spot", "c7i.large", "subnet-1")
    assert token == client_token(long_id, "spot", "c7i.large", "subnet-1")
    assert token != client_token(long_id, "on-demand", "c7i.large", "subnet-1")
    assert token != client_token("w" * 81, "spot", "c7i.large", "subnet-1")
    assert len(token) <= 64


def _agent_server() -> ThreadingHTTPServer:
    """The service's ``GET /v1/agent/<name>`` as far as a boot script sees it, on 127.0.0.1;
    ``tampered`` files are served with their last byte changed."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.rsplit("/", 1)[-1]
            try:
                data = files("images.agent").joinpath(name).read_bytes()
            except (FileNotFoundError, OSError):
                self.send_error(404)
                return
            if name in self.server.tampered:  # type: ignore[attr-defined]
                data = data[:-1] + b"#"
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.tampered = set()  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_linux_user_data_fetches_and_installs_the_agent(make_provisioner, make_spec, tmp_path):
    """Run the real boot script, staged under tmp_path (DESTDIR, no systemd, no IMDS),
    against a local stand-in of the service's agent files."""
    agents = _agent_server()
    spec = make_spec(service_url=f"http://127.0.0.1:{agents.server_address[1]}")
    script = make_provisioner().user_data(spec)
    root = tmp_path / "root"
    staged = (
        script.replace("stage=/run/workerlease-bootstrap", f"stage={tmp_path}/stage")
        .replace("imds=http://169.254.169.254/latest", "imds=http://127.0.0.1:9/latest")
        .replace("sh install.sh --service", f"DESTDIR={root} sh install.sh")
    )
    assert staged.count(str(tmp_path)) == 2  # both substitutions applied

    result = subprocess.run(["bash", "-c", staged], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    installed = (root / "opt/workerlease/workerlease_agent.py").read_bytes()
    assert installed == files("images.agent").joinpath("workerlease_agent.py").read_bytes()
    env = (root / "etc/workerlease/agent.env").read_text()
    assert f"WORKERLEASE_BOOTSTRAP_TOKEN='{spec.bootstrap_token}'" in env
    assert f"WORKERLEASE_WORKER_ID='{spec.worker_id}'" in env
    assert not (tmp_path / "stage").exists()  # the staging copy is removed

    # A file that is not the pinned one is never installed (fewer attempts, same check).
    agents.tampered.add("workerlease_agent.py")  # type: ignore[attr-defined]
    refused = subprocess.run(
        ["bash", "-c", staged.replace("seq 60", "seq 2").replace("sleep 5", "sleep 0")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    agents.shutdown()
    assert refused.returncode != 0
    assert "cannot fetch workerlease_agent.py" in refused.stderr


def test_destroy_many_reports_a_refused_batch_per_worker(make_provisioner, make_spec):
    provisioner = make_provisioner()
    handles = [provisioner.create(make_spec()) for _ in range(2)]

    def refuse(**_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        error = {"Code": "UnauthorizedOperation", "Message": "injected"}
        return AWSResponse("", 403, {}, None), {"Error": error, "ResponseMetadata": {}}

    provisioner.client().meta.events.register("before-call.ec2.TerminateInstances", refuse)

    results = provisioner.destroy_many(handles)

    assert set(results) == {h.worker_id for h in handles}
    assert all(isinstance(e, PermanentProvisionerError) for e in results.values())
    with pytest.raises(PermanentProvisionerError, match="UnauthorizedOperation"):
        provisioner.destroy(handles[0])


def test_user_data_refuses_environment_the_installer_would_reject(make_provisioner, make_spec):
    provisioner = make_provisioner()
    for extra_env in ({"WORKERLEASE_X": "it's"}, {"BAD NAME": "x"}, {"WORKERLEASE_X": "a\nb"}):
        with pytest.raises(PermanentProvisionerError, match="agent environment"):
            provisioner.user_data(make_spec(extra_env=extra_env))
