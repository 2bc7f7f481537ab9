"""The whole service on an EC2 pool against moto's EC2 server: the issue's lease lifecycle.

The service runs on a real HTTP server on 127.0.0.1 (``tests.support.live``) and the
test runs the scheduler's passes. Pools use ``ready_when: running`` (moto instances run
no agent): the health pass marks a worker ready once DescribeInstances says running.
Every test checks the service's own answers (HTTP, database) and moto's listing.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ReadTimeoutError
from sqlmodel import select

from provisioners.base import WorkerSpec
from provisioners.ec2 import TAG_DEPLOYMENT, TAG_POOL, TAG_WORKER, EC2Options, EC2Provisioner
from service.db import session_scope
from service.models import Lease, Pool, Worker
from service.pools import plan_refill
from service.workers import claim_creates
from tests.integration.ec2.conftest import REGION, assert_at_most_two_per_second
from tests.support.live import LiveService, live_service

pytestmark = [pytest.mark.aws, pytest.mark.integration]

POOL = "hosted-ubuntu"
CAPACITY = "InsufficientInstanceCapacity"


# ---------------------------------------------------------------- helpers


def instances_of(ec2: Any, deployment: str) -> list[dict[str, Any]]:
    """Every instance moto holds for ``deployment`` (any state), with its tags as a dict."""
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": f"tag:{TAG_DEPLOYMENT}", "Values": [deployment]}]
    )
    found = []
    for page in pages:
        for reservation in page["Reservations"]:
            for instance in reservation["Instances"]:
                instance = dict(instance)
                instance["TagMap"] = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                found.append(instance)
    return found


def live_instances(ec2: Any, deployment: str) -> dict[str, dict[str, Any]]:
    """Instance id -> instance, for the deployment's instances that are not terminated."""
    return {
        i["InstanceId"]: i
        for i in instances_of(ec2, deployment)
        if i["State"]["Name"] not in ("shutting-down", "terminated")
    }


def instance_state(ec2: Any, instance_id: str) -> str:
    reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return str(reservations[0]["Instances"][0]["State"]["Name"])


def workers(live: LiveService, *states: str) -> list[Worker]:
    with session_scope(live.rt.factory) as session:
        statement = select(Worker)
        if states:
            statement = statement.where(Worker.state.in_(states))  # type: ignore[attr-defined]
        return list(session.exec(statement).all())


def worker(live: LiveService, worker_id: str) -> Worker:
    with session_scope(live.rt.factory) as session:
        row = session.get(Worker, worker_id)
        assert row is not None
        return row


def admin_pool(live: LiveService) -> dict[str, Any]:
    pools = live.call("GET", "/v1/admin/pools").json()["pools"]
    found: dict[str, Any] = next(p for p in pools if p["name"] == POOL)
    return found


def degraded_metric(live: LiveService) -> float:
    text = requests.get(live.url + "/metrics", timeout=10).text
    match = re.search(rf'^workerlease_pool_degraded\{{pool="{POOL}"\}} (\S+)$', text, re.M)
    assert match is not None, "workerlease_pool_degraded missing from /metrics"
    return float(match.group(1))


def service_provisioner(live: LiveService) -> EC2Provisioner:
    """The provisioner instance the service itself uses for the pool (cached by options)."""
    with session_scope(live.rt.factory) as session:
        pool = session.get(Pool, POOL)
        assert pool is not None
    provisioner = live.rt.provisioners.for_pool(pool)
    assert isinstance(provisioner, EC2Provisioner)
    return provisioner


class RunInstancesTap:
    """Records the service's RunInstances calls; fails those placed in ``failing`` subnets.

    A ``before-call`` handler that returns a response short-circuits botocore's HTTP
    request, so the injected capacity error looks to the provisioner like EC2's own.
    ``times`` are taken at ``before-send``, when a request really leaves (after the
    provisioner's rate limiter, which waits on the same event).
    """

    def __init__(self, client: Any) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[float, str | None]] = []  # (monotonic time, subnet)
        self.sent: list[float] = []
        self.failing: set[str] = set()
        client.meta.events.register("before-call.ec2.RunInstances", self._handler)
        client.meta.events.register("before-send.ec2.RunInstances", self._sent)

    def _sent(self, **_: Any) -> None:
        with self.lock:
            self.sent.append(time.monotonic())

    def _handler(
        self, params: dict[str, Any], **_: Any
    ) -> tuple[AWSResponse, dict[str, Any]] | None:
        subnet = params["body"].get("SubnetId")
        with self.lock:
            self.calls.append((time.monotonic(), subnet))
            fail = subnet in self.failing
        if not fail:
            return None
        error = {"Code": CAPACITY, "Message": f"injected {CAPACITY} in {subnet}"}
        return AWSResponse("", 500, {}, None), {"Error": error, "ResponseMetadata": {}}

    @property
    def subnets(self) -> list[str | None]:
        with self.lock:
            return [subnet for _, subnet in self.calls]

    @property
    def times(self) -> list[float]:
        with self.lock:
            return sorted(self.sent)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def ec2_pool(
    moto_endpoint: str, images: dict[str, str], network: dict[str, Any]
) -> Callable[..., dict[str, Any]]:
    def make(**overrides: Any) -> dict[str, Any]:
        pool: dict[str, Any] = {
            "name": POOL,
            "os": "ubuntu",
            "provisioner": "ec2",
            "min_ready": 1,
            "max_workers": 3,
            "provision_timeout": "5m",
            "options": {
                "region": REGION,
                "endpoint_url": moto_endpoint,
                "image_id": images["ubuntu"],
                "instance_types": ["t3.micro"],
                "subnet_ids": network["subnet_ids"],
                "security_group_ids": [network["security_group_id"]],
                "ready_when": "running",
                "max_attempts": 2,
            },
        }
        pool.update(overrides)
        return pool

    return make


@pytest.fixture
def start(
    tmp_path: Path, deployment_id: str, ec2_pool: Callable[..., dict[str, Any]]
) -> Callable[..., AbstractContextManager[LiveService]]:
    def run(**pool_overrides: Any) -> AbstractContextManager[LiveService]:
        return live_service(
            f"sqlite:///{tmp_path / 'wl.db'}", [ec2_pool(**pool_overrides)], deployment_id
        )

    return run


@pytest.fixture
def live(start: Callable[..., AbstractContextManager[LiveService]]) -> Iterator[LiveService]:
    with start() as service:
        yield service


def ready(live: LiveService, n: int) -> Callable[[], bool]:
    return lambda: live.pool_counts(POOL).get("ready", 0) >= n


# ---------------------------------------------------------------- tests


def test_refill_lease_release_terminates_and_refills_with_a_new_instance(
    start: Callable[..., AbstractContextManager[LiveService]], ec2: Any, deployment_id: str
) -> None:
    with start(min_ready=2, max_workers=3) as live:
        live.tick_until(ready(live, 2), timeout_s=30)

        rows = {w.id: w for w in workers(live, "ready")}
        running = live_instances(ec2, deployment_id)
        assert len(rows) == 2 and len(running) == 2
        assert {w.provider_id for w in rows.values()} == set(running)
        for instance in running.values():
            assert instance["State"]["Name"] == "running"
            tags = instance["TagMap"]
            assert tags[TAG_DEPLOYMENT] == deployment_id
            assert tags[TAG_POOL] == POOL
            assert rows[tags[TAG_WORKER]].provider_id == instance["InstanceId"]
            assert tags["Name"] == f"workerlease-{tags[TAG_WORKER]}"

        token = live.tenant_token()
        response = live.call("POST", "/v1/leases", token, json={"pool": POOL})
        assert response.status_code == 201, response.text
        lease = response.json()
        assert lease["state"] == "active"
        leased = lease["worker"]
        instance_id = rows[leased["id"]].provider_id
        assert instance_id is not None
        assert leased["address"] == running[instance_id]["PrivateIpAddress"]
        assert worker(live, leased["id"]).state == "leased"

        released = live.call("DELETE", f"/v1/leases/{lease['id']}", token)
        assert released.status_code == 200 and released.json()["state"] == "released"
        live.tick()
        assert instance_state(ec2, instance_id) == "terminated"
        assert worker(live, leased["id"]).state == "destroyed"

        live.tick_until(ready(live, 2), timeout_s=30)
        ready_rows = workers(live, "ready")
        assert leased["id"] not in {w.id for w in ready_rows}
        assert instance_id not in {w.provider_id for w in ready_rows}
        running = live_instances(ec2, deployment_id)
        assert set(running) == {w.provider_id for w in ready_rows}
        assert instance_id not in running
        assert len(instances_of(ec2, deployment_id)) == 3  # two kept, one new, none reused


def test_idle_lease_expires_and_its_instance_is_terminated(
    start: Callable[..., AbstractContextManager[LiveService]], ec2: Any, deployment_id: str
) -> None:
    with start(lease_idle_timeout=2) as live:
        live.tick_until(ready(live, 1), timeout_s=30)
        token = live.tenant_token()
        lease = live.call("POST", "/v1/leases", token, json={"pool": POOL}).json()
        assert lease["state"] == "active"
        instance_id = worker(live, lease["worker"]["id"]).provider_id
        assert instance_id is not None

        # A pass one second before the idle deadline, at that time: nothing ends. (At the
        # wall clock's time, 2 s after the lease, a slow machine could already be past it.)
        idle_deadline = datetime.fromisoformat(lease["idle_expires_at"])
        live.tick(now=idle_deadline - timedelta(seconds=1))
        assert live.call("GET", f"/v1/leases/{lease['id']}", token).json()["state"] == "active"
        assert instance_state(ec2, instance_id) == "running"

        # Then passes at the wall clock's time until it has ended, not a fixed sleep.
        def ended_lease() -> dict[str, Any] | None:
            got: dict[str, Any] = live.call("GET", f"/v1/leases/{lease['id']}", token).json()
            return got if got["state"] != "active" else None

        live.tick_until(lambda: ended_lease() is not None)
        ended = ended_lease()
        assert ended is not None
        assert ended["state"] == "expired"
        assert ended["end_reason"] == "idle_timeout"
        assert instance_state(ec2, instance_id) == "terminated"
        assert worker(live, lease["worker"]["id"]).state == "destroyed"


def test_capacity_fallback_degraded_backoff_and_recovery(
    live: LiveService, ec2: Any, deployment_id: str, network: dict[str, Any]
) -> None:
    first, second = network["subnet_ids"]
    tap = RunInstancesTap(service_provisioner(live).client())

    # No capacity in the first subnet: the same create moves on to the second.
    tap.failing = {first}
    live.tick_until(ready(live, 1), timeout_s=30)
    assert tap.subnets == [first, second]
    (only,) = live_instances(ec2, deployment_id).values()
    assert only["SubnetId"] == second
    assert only["InstanceId"] == workers(live, "ready")[0].provider_id
    assert admin_pool(live)["degraded_reason"] is None
    assert degraded_metric(live) == 0

    # No capacity anywhere: the pool is degraded, visibly, and backs off.
    tap.failing = {first, second}
    patched = live.call("PATCH", f"/v1/admin/pools/{POOL}", json={"min_ready": 2})
    assert patched.status_code == 200, patched.text
    before = len(tap.calls)
    failed_at = datetime.now(UTC)
    live.tick()
    assert tap.subnets[before:] == [first, second]
    reason = admin_pool(live)["degraded_reason"]
    assert reason is not None and CAPACITY in reason and "CapacityError" in reason
    assert degraded_metric(live) == 1
    assert len(live_instances(ec2, deployment_id)) == 1  # nothing half-made

    calls_after_failure = len(tap.calls)
    with session_scope(live.rt.factory) as session:
        pool = session.get(Pool, POOL)
        assert pool is not None and pool.create_backoff_until is not None
        backoff_until = pool.create_backoff_until
    assert backoff_until > failed_at
    # Two more passes inside the backoff (5 s at first), at a time inside it: on a loaded
    # machine two passes at the wall clock's time may already be past it.
    inside = backoff_until - timedelta(seconds=1)
    live.tick(now=inside)
    live.tick(now=inside)
    assert len(tap.calls) == calls_after_failure, "retried in a hot loop, not after a backoff"

    # Capacity returns; the backoff (5 s at first) is cut short in the database.
    tap.failing = set()
    with session_scope(live.rt.factory) as session:
        pool = session.get(Pool, POOL)
        assert pool is not None
        pool.create_backoff_until = datetime.now(UTC) - timedelta(seconds=1)
        session.add(pool)
    live.tick_until(ready(live, 2), timeout_s=30)
    assert admin_pool(live)["degraded_reason"] is None
    assert degraded_metric(live) == 0
    assert len(tap.calls) == calls_after_failure + 1
    assert {w.provider_id for w in workers(live, "ready")} == set(
        live_instances(ec2, deployment_id)
    )


def test_create_retried_after_a_crash_between_run_instances_and_the_database_update(
    live: LiveService, ec2: Any, deployment_id: str, ec2_pool: Callable[..., dict[str, Any]]
) -> None:
    # The crashed process: it planned and claimed a worker, launched its instance, and
    # died before writing the instance id.
    now = datetime.now(UTC)
    with session_scope(live.rt.factory) as session:
        (planned,) = plan_refill(session, now)
    with session_scope(live.rt.factory) as session:
        (claimed,) = claim_creates(session, POOL, now, 10)
    assert claimed.id == planned.id
    crashed = EC2Provisioner(POOL, EC2Options.model_validate(ec2_pool()["options"]))
    try:
        spec = WorkerSpec(
            worker_id=claimed.id,
            pool=POOL,
            os="ubuntu",
            deployment_id=deployment_id,
            service_url=live.url,
            bootstrap_token=claimed.bootstrap_token or "",
        )
        launched = crashed.create(spec)
    finally:
        crashed.close()
    row = worker(live, claimed.id)
    assert row.provider_id is None and row.state == "provisioning"

    tap = RunInstancesTap(service_provisioner(live).client())
    live.tick()  # the claim has not lapsed: nobody touches the worker yet
    assert tap.calls == []
    assert worker(live, claimed.id).provider_id is None

    with session_scope(live.rt.factory) as session:
        lapsed = session.get(Worker, claimed.id)
        assert lapsed is not None
        lapsed.claimed_until = datetime.now(UTC) - timedelta(seconds=1)
        session.add(lapsed)
    live.tick_until(ready(live, 1), timeout_s=30)

    tagged = [i for i in instances_of(ec2, deployment_id) if i["TagMap"][TAG_WORKER] == claimed.id]
    assert [i["InstanceId"] for i in tagged] == [launched.provider_id]
    assert tagged[0]["State"]["Name"] == "running"
    row = worker(live, claimed.id)
    assert row.state == "ready"
    assert row.provider_id == launched.provider_id
    assert row.address == launched.address
    assert row.create_attempts == 2
    assert tap.calls == []  # found by its tag, not launched again
    assert len(live_instances(ec2, deployment_id)) == 1


def test_reconcile_terminates_unknown_instances_of_this_deployment_only(
    live: LiveService,
    ec2: Any,
    deployment_id: str,
    images: dict[str, str],
    network: dict[str, Any],
) -> None:
    live.tick_until(ready(live, 1), timeout_s=30)
    (known,) = workers(live, "ready")

    def launch(deployment: str, worker_id: str) -> str:
        tags = [
            {"Key": TAG_DEPLOYMENT, "Value": deployment},
            {"Key": TAG_POOL, "Value": POOL},
            {"Key": TAG_WORKER, "Value": worker_id},
        ]
        instance = ec2.run_instances(
            ImageId=images["ubuntu"],
            MinCount=1,
            MaxCount=1,
            InstanceType="t3.micro",
            SubnetId=network["subnet_ids"][0],
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )["Instances"][0]
        return str(instance["InstanceId"])

    orphan = launch(deployment_id, "w-" + "0" * 20)
    other_deployment = deployment_id + "-other"
    foreign = launch(other_deployment, "w-" + "1" * 20)
    try:
        live.reconcile()

        assert instance_state(ec2, orphan) == "terminated"
        assert instance_state(ec2, foreign) == "running"
        assert known.provider_id is not None
        assert instance_state(ec2, known.provider_id) == "running"
        assert set(live_instances(ec2, deployment_id)) == {known.provider_id}
        assert worker(live, known.id).state == "ready"
    finally:
        ec2.terminate_instances(InstanceIds=[foreign])


def test_burst_of_50_leases_never_exceeds_2_run_instances_per_second(
    start: Callable[..., AbstractContextManager[LiveService]], ec2: Any, deployment_id: str
) -> None:
    # The provision timeout far above any wait here: the test is about the launch rate.
    # With 5 minutes, beside the full crash suite moto answered so slowly (every create
    # first describes the deployment's instances) that no worker was running within it;
    # all 50 timed out, were replaced, and the wait below went round for good.
    with start(min_ready=0, max_workers=50, provision_timeout="60m") as live:
        tap = RunInstancesTap(service_provisioner(live).client())
        tokens = [live.tenant_token(f"tenant-{n:02d}") for n in range(50)]

        def lease(token: str) -> tuple[str, dict[str, Any]]:
            response = live.call("POST", "/v1/leases", token, json={"pool": POOL})
            assert response.status_code in (201, 202), response.text
            return token, response.json()

        with ThreadPoolExecutor(max_workers=50) as pool:
            leases = list(pool.map(lease, tokens))
        assert {body["state"] for _, body in leases} == {"pending"}

        def states() -> list[str]:
            with session_scope(live.rt.factory) as session:
                return sorted(lease.state for lease in session.exec(select(Lease)).all())

        def all_active() -> bool:
            return states() == ["active"] * 50

        def progress() -> tuple[int, int, int]:
            """Forward steps only (a cycle of timeouts and replacements is no progress):
            leases active, workers that reached ready, launches sent."""
            with session_scope(live.rt.factory) as session:
                became_ready = sum(
                    w.ready_at is not None for w in session.exec(select(Worker)).all()
                )
            return states().count("active"), became_ready, len(tap.times)

        # 50 launches at 2 per 1.05 s take 25 s (30 s here on a quiet machine; over 240 s
        # beside the full crash suite). The bound is on a stall: it restarts while the work
        # advances (beside two other suites at load 16, after moto answered one launch with
        # garbage, no lease became active for 120 s), and 30 minutes bound it in all.
        deadline = time.monotonic() + 30 * 60
        live.tick_until(
            lambda: all_active() or time.monotonic() > deadline,
            timeout_s=180,
            every_s=0.2,
            progress=progress,
        )
        assert all_active(), f"not all active within 30 minutes: {progress()}"

        times = tap.times
        assert len(times) >= 50  # more if moto broke on a concurrent launch and it was retried
        assert_at_most_two_per_second(times)

        running = live_instances(ec2, deployment_id)
        assert len(running) == 50
        by_worker = {i["TagMap"][TAG_WORKER]: i for i in running.values()}
        for token, body in leases:
            current = live.call("GET", f"/v1/leases/{body['id']}", token).json()
            assert current["state"] == "active"
            instance = by_worker[current["worker"]["id"]]
            assert current["worker"]["address"] == instance["PrivateIpAddress"]
        assert len(by_worker) == 50


def test_instance_terminated_outside_the_service_fails_the_lease_and_is_replaced(
    live: LiveService, ec2: Any, deployment_id: str
) -> None:
    live.tick_until(ready(live, 1), timeout_s=30)
    token = live.tenant_token()
    lease = live.call("POST", "/v1/leases", token, json={"pool": POOL}).json()
    assert lease["state"] == "active"
    gone = worker(live, lease["worker"]["id"])
    assert gone.provider_id is not None

    ec2.terminate_instances(InstanceIds=[gone.provider_id])
    live.tick()

    ended = live.call("GET", f"/v1/leases/{lease['id']}", token).json()
    assert ended["state"] == "failed"
    assert ended["end_reason"] == "failed"
    assert worker(live, gone.id).state in ("destroying", "destroyed")

    live.tick_until(ready(live, 1), timeout_s=30)
    (replacement,) = workers(live, "ready")
    assert replacement.id != gone.id
    assert set(live_instances(ec2, deployment_id)) == {replacement.provider_id}
    assert worker(live, gone.id).state == "destroyed"


def test_instance_launched_by_a_create_that_then_failed_is_terminated_with_its_row(
    live: LiveService, ec2: Any, deployment_id: str
) -> None:
    """RunInstances reached EC2 but its answer was lost (read timeout after retries).

    The service fails the worker and schedules its destroy "so a half-created resource
    does not outlive its row"; the row has no instance id, so the EC2 provisioner must
    find the instance by its worker tag.
    """
    client = service_provisioner(live).client()
    lost: list[str] = []

    def lose_answer(parsed: dict[str, Any], **_: Any) -> None:
        if not lost:
            lost.append(parsed["Instances"][0]["InstanceId"])
            raise ReadTimeoutError(endpoint_url="http://127.0.0.1 (injected)")

    client.meta.events.register("after-call.ec2.RunInstances", lose_answer)
    live.tick()  # create fails after launching; the same tick's destroy pass runs

    (failed,) = [w for w in workers(live) if w.last_error and w.last_error.startswith("create")]
    assert failed.provider_id is None
    (launched,) = [
        i for i in instances_of(ec2, deployment_id) if i["TagMap"][TAG_WORKER] == failed.id
    ]
    assert launched["InstanceId"] == lost[0]
    assert worker(live, failed.id).state == "destroyed"
    # The service believes the resource is gone: it must really be.
    assert instance_state(ec2, lost[0]) in ("shutting-down", "terminated"), (
        f"worker {failed.id} is destroyed in the database but its instance {lost[0]} "
        "is still running (destroy with an empty provider_id terminated nothing)"
    )
