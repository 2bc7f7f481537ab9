"""``EC2Provisioner``: one EC2 instance per worker, found again by its tags."""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from provisioners.base import (
    CapacityError,
    PermanentProvisionerError,
    Provisioner,
    ProvisionerError,
    ResourceState,
    TransientProvisionerError,
    WorkerHandle,
    WorkerSpec,
)
from provisioners.ec2.errors import error_code, translate_error
from provisioners.ec2.options import (
    TAG_DEPLOYMENT,
    TAG_INSTALLATION,
    TAG_POOL,
    TAG_WORKER,
    EC2Options,
)
from provisioners.ec2.throttling import FAMILY_OF_OPERATION, rate_limiter
from provisioners.userdata import agent_files, render_user_data

log = logging.getLogger(__name__)

UNPARSEABLE_ATTEMPTS = 4  # an answer that is not EC2's XML: tried this often in all
UNPARSEABLE_BACKOFF_S = 0.5  # times the attempt number, with jitter

USER_DATA_LIMIT = 16 * 1024  # EC2 limit on raw user data, before base64
ID_BATCH = 1000  # TerminateInstances / DescribeInstances accept up to 1000 ids
LIVE_STATES = ("pending", "running", "stopping", "stopped")
# A worker whose instance is going away is still "its" instance for create(): launching
# a second machine under the same worker id would leave two resources for one row.
NOT_TERMINATED_STATES = (*LIVE_STATES, "shutting-down")
STATE_MAP = {"pending": ResourceState.PENDING, "running": ResourceState.RUNNING}
# DescribeInstances may not know an instance for a few seconds after RunInstances.
LAUNCH_VISIBILITY_GRACE_S = 60.0
_INSTANCE_ID = re.compile(r"\bi-[0-9a-f]+\b")

T = TypeVar("T")


class EC2Provisioner(Provisioner[EC2Options]):
    """Workers are EC2 instances; see the package docstring for ownership and throttling."""

    name = "ec2"
    Options = EC2Options
    destroy_batch_size = ID_BATCH  # TerminateInstances takes up to 1000 ids

    def __init__(self, pool: str, options: EC2Options) -> None:
        super().__init__(pool, options)
        self._lock = threading.Lock()
        self._client: Any = None
        # instance id -> monotonic launch time, to bridge DescribeInstances' lag.
        self._launched: dict[str, float] = {}

    def client(self) -> Any:
        """The EC2 client, created on first use (after a test's endpoint exists)."""
        with self._lock:
            if self._client is None:
                config = Config(
                    retries={"mode": "adaptive", "max_attempts": self.options.max_attempts},
                    connect_timeout=5,
                    read_timeout=60,
                    max_pool_connections=32,
                    user_agent_extra="workerlease",
                )
                # A Session per provisioner: boto3's default session is not thread-safe.
                client = boto3.session.Session().client(
                    "ec2",
                    region_name=self.options.region,
                    endpoint_url=self.options.endpoint_url,
                    config=config,
                )
                # Every request on the wire waits its turn, botocore's own retries
                # included: limiting calls alone let retries exceed the budget.
                for operation, family in FAMILY_OF_OPERATION.items():
                    client.meta.events.register(
                        f"before-send.ec2.{operation}", functools.partial(self._throttle, family)
                    )
                self._client = client
            return self._client

    def _throttle(self, family: str, **_: Any) -> None:
        rate_limiter(self.options.region, self.options.endpoint_url, family).acquire(
            self.options.throttle_max_wait_s
        )

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        """One EC2 call (rate limited per request); botocore exceptions pass through.

        An answer that is not EC2's XML at all (an HTML 500 page from something between
        us and EC2, or from moto) is retried here: botocore retries 5xx only when it can
        parse them. Every call made is idempotent (launches carry a ClientToken).
        """
        for attempt in range(1, UNPARSEABLE_ATTEMPTS + 1):
            try:
                result: dict[str, Any] = getattr(self.client(), operation)(**params)
                return result
            except ResponseParserError as exc:
                if attempt == UNPARSEABLE_ATTEMPTS:
                    raise TransientProvisionerError(
                        f"{operation}: the answer was not EC2's XML {attempt} times"
                    ) from exc
                log.warning("ec2_unparseable_answer operation=%s attempt=%d", operation, attempt)
                time.sleep(UNPARSEABLE_BACKOFF_S * attempt * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    def _describe_pages(self, **params: Any) -> Iterator[dict[str, Any]]:
        """Every instance DescribeInstances returns, one rate-limited page at a time."""
        while True:
            page = self._call("describe_instances", **params)
            for reservation in page.get("Reservations", []):
                yield from reservation.get("Instances", [])
            token = page.get("NextToken")
            if not token:
                return
            params = {**params, "NextToken": token}

    def _os_family(self, spec: WorkerSpec) -> str:
        if self.options.os:
            return self.options.os
        return "windows" if spec.os == "windows" else "linux"

    def _handle(self, instance: Mapping[str, Any], worker_id: str, pool: str) -> WorkerHandle:
        tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
        return WorkerHandle(
            worker_id=worker_id,
            pool=pool,
            provider_id=instance["InstanceId"],
            address=instance.get("PrivateIpAddress"),
            installation=tags.get(TAG_INSTALLATION),
        )

    @property
    def ready_when_running(self) -> bool:
        return self.options.ready_when == "running"

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def create(self, spec: WorkerSpec) -> WorkerHandle:
        try:
            existing = self._find_instance(spec)
        except (ClientError, BotoCoreError) as exc:
            raise translate_error(exc, "DescribeInstances") from exc
        if existing is not None:
            log.info(
                "ec2_create_found_existing pool=%s worker=%s instance=%s",
                spec.pool,
                spec.worker_id,
                existing["InstanceId"],
            )
            return self._handle(existing, spec.worker_id, spec.pool)
        user_data = self.user_data(spec)
        tried: list[str] = []
        last_exc: Exception | None = None
        for market, instance_type, subnet in self._placements():
            params = self._run_params(spec, user_data, market, instance_type, subnet)
            try:
                response = self._call("run_instances", **params)
            except (ClientError, BotoCoreError) as exc:
                error = translate_error(exc, "RunInstances")
                if not isinstance(error, CapacityError):
                    raise error from exc
                last_exc = exc
                code = error_code(exc) if isinstance(exc, ClientError) else "?"
                where = f"{market}/{instance_type or 'template'}/{subnet or 'default'}"
                tried.append(f"{where}: {code}")
                log.info(
                    "ec2_create_no_capacity pool=%s worker=%s placement=%s code=%s",
                    spec.pool,
                    spec.worker_id,
                    where,
                    code,
                )
                continue
            instance = response["Instances"][0]
            with self._lock:
                self._launched[instance["InstanceId"]] = time.monotonic()
            log.info(
                "ec2_create_launched pool=%s worker=%s instance=%s market=%s instance_type=%s"
                " subnet=%s",
                spec.pool,
                spec.worker_id,
                instance["InstanceId"],
                market,
                instance_type,
                subnet,
            )
            return self._handle(instance, spec.worker_id, spec.pool)
        raise CapacityError(
            f"no EC2 capacity for worker {spec.worker_id} in pool {spec.pool}; tried "
            + "; ".join(tried)
        ) from last_exc

    def _find_instance(self, spec: WorkerSpec) -> dict[str, Any] | None:
        filters = [
            {"Name": f"tag:{TAG_WORKER}", "Values": [spec.worker_id]},
            {"Name": f"tag:{TAG_DEPLOYMENT}", "Values": [spec.deployment_id]},
            {"Name": "instance-state-name", "Values": list(NOT_TERMINATED_STATES)},
        ]
        found = sorted(self._describe_pages(Filters=filters), key=lambda i: str(i["LaunchTime"]))
        if len(found) > 1:
            log.warning(
                "ec2_create_duplicates pool=%s worker=%s instances=%s",
                spec.pool,
                spec.worker_id,
                ",".join(i["InstanceId"] for i in found),
            )
        return found[0] if found else None

    def _placements(self) -> Iterator[tuple[str, str | None, str | None]]:
        markets = (
            ["spot", "on-demand"]
            if self.options.market == "spot-then-on-demand"
            else [self.options.market]
        )
        for market in markets:
            for instance_type in self.options.instance_types or (None,):
                for subnet in self.options.subnet_ids or (None,):
                    yield market, instance_type, subnet

    def user_data(self, spec: WorkerSpec) -> str:
        """The user data for ``spec``; raises PermanentProvisionerError above 16 KB."""
        os_family = self._os_family(spec)
        if self.options.ready_when == "running":
            if not self.options.user_data_extra:
                return ""
            return render_user_data({}, os_family, {}, self.options.user_data_extra)
        env = spec.agent_environment()
        env.update(self.options.agent_env)
        env["WORKERLEASE_AGENT_PORT"] = str(spec.agent_port or self.options.agent_port)
        env["WORKERLEASE_AGENT_HOST"] = "0.0.0.0"
        text = render_user_data(
            env, os_family, agent_files(os_family), self.options.user_data_extra
        )
        size = len(text.encode())
        if size > USER_DATA_LIMIT:
            raise PermanentProvisionerError(
                f"user data is {size} bytes, over EC2's {USER_DATA_LIMIT}; "
                "shorten user_data_extra or the agent"
            )
        return text

    def _tags(self, spec: WorkerSpec) -> list[dict[str, str]]:
        tags = {
            **self.options.tags,
            "Name": f"workerlease-{spec.worker_id}",
            TAG_DEPLOYMENT: spec.deployment_id,
            TAG_POOL: spec.pool,
            TAG_WORKER: spec.worker_id,
        }
        if spec.installation_id:
            tags[TAG_INSTALLATION] = spec.installation_id
        return [{"Key": key, "Value": value} for key, value in tags.items()]

    def _run_params(
        self,
        spec: WorkerSpec,
        user_data: str,
        market: str,
        instance_type: str | None,
        subnet: str | None,
    ) -> dict[str, Any]:
        o = self.options
        tags = self._tags(spec)
        params: dict[str, Any] = {
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": client_token(spec.worker_id, market, instance_type, subnet),
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
            "MetadataOptions": {
                "HttpTokens": "required",
                "HttpPutResponseHopLimit": 1,
                "HttpEndpoint": "enabled",
            },
        }
        optional = {
            "ImageId": o.image_id,
            "InstanceType": instance_type,
            "SubnetId": subnet,
            "SecurityGroupIds": list(o.security_group_ids) or None,
            "KeyName": o.key_name,
            "UserData": user_data or None,
            "LaunchTemplate": o.launch_template.as_param() if o.launch_template else None,
        }
        params.update({key: value for key, value in optional.items() if value is not None})
        if o.iam_instance_profile:
            key = "Arn" if o.iam_instance_profile.startswith("arn:") else "Name"
            params["IamInstanceProfile"] = {key: o.iam_instance_profile}
        if o.root_volume_gb:
            params["BlockDeviceMappings"] = [
                {
                    "DeviceName": o.root_device_name,
                    "Ebs": {
                        "VolumeSize": o.root_volume_gb,
                        "VolumeType": "gp3",
                        "Encrypted": True,
                        "DeleteOnTermination": True,
                    },
                }
            ]
        if market == "spot":
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            }
        return params

    def destroy(self, handle: WorkerHandle) -> None:
        error = self.destroy_many([handle])[handle.worker_id]
        if error is not None:
            raise error

    def destroy_many(self, handles: Iterable[WorkerHandle]) -> dict[str, Exception | None]:
        """TerminateInstances in batches of 1000; an instance EC2 does not know is gone.

        A handle without an instance id (its create's answer was lost) is found by its
        worker tag first; an empty id is never sent to EC2.
        """
        workers_by_instance: dict[str, list[str]] = {}
        results: dict[str, Exception | None] = {}
        unknown = [h for h in handles if not h.provider_id]
        for handle in handles:
            if handle.provider_id:
                workers_by_instance.setdefault(handle.provider_id, []).append(handle.worker_id)
        for worker_id, found in self._instances_by_worker_tag(unknown, results).items():
            for instance_id in found:
                workers_by_instance.setdefault(instance_id, []).append(worker_id)
        for batch in _chunks(list(workers_by_instance), ID_BATCH):
            error: Exception | None = None
            try:
                _, missing = self._dropping_missing(batch, self._terminate)
            except ProvisionerError as exc:  # the client-side rate limit's bounded wait
                error = exc
            except (ClientError, BotoCoreError) as exc:
                error = translate_error(exc, "TerminateInstances")
                error.__cause__ = exc
            else:
                if missing:
                    log.info(
                        "ec2_destroy_already_gone pool=%s instances=%s",
                        self.pool,
                        ",".join(sorted(missing)),
                    )
            for instance_id in batch:
                for worker_id in workers_by_instance[instance_id]:
                    results[worker_id] = error
        return results

    def _instances_by_worker_tag(
        self, handles: list[WorkerHandle], results: dict[str, Exception | None]
    ) -> dict[str, list[str]]:
        """Worker id -> its non-terminated instances, for handles without an instance id.

        Workers with no instance get ``None`` in ``results`` (nothing was launched); a
        failed lookup puts its error there.
        """
        found: dict[str, list[str]] = {}
        for batch in _chunks([h.worker_id for h in handles], 200):
            try:
                for instance in self._describe_pages(
                    Filters=[
                        {"Name": f"tag:{TAG_WORKER}", "Values": batch},
                        {"Name": f"tag:{TAG_POOL}", "Values": [self.pool]},
                        {"Name": "instance-state-name", "Values": list(NOT_TERMINATED_STATES)},
                    ]
                ):
                    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                    found.setdefault(tags[TAG_WORKER], []).append(instance["InstanceId"])
            except (ClientError, BotoCoreError, ProvisionerError) as exc:
                error = (
                    exc
                    if isinstance(exc, ProvisionerError)
                    else translate_error(exc, "DescribeInstances")
                )
                results.update({worker_id: error for worker_id in batch})
                continue
            results.update({w: None for w in batch if w not in found})
        return found

    def _terminate(self, ids: list[str]) -> dict[str, Any]:
        return self._call("terminate_instances", InstanceIds=ids)

    def _dropping_missing(
        self, ids: list[str], call: Callable[[list[str]], T]
    ) -> tuple[list[T], set[str]]:
        """Run ``call`` on ``ids``; retry without ids EC2 reports as not found.

        EC2 fails a whole batch with ``InvalidInstanceID.NotFound`` when any id is
        unknown and names those ids in the message; when it does not, the batch is
        split in halves until each unknown id is alone.
        """
        results: list[T] = []
        missing: set[str] = set()
        todo = [ids]
        while todo:
            batch = [i for i in todo.pop() if i not in missing]
            if not batch:
                continue
            try:
                results.append(call(batch))
            except ClientError as exc:
                if error_code(exc) != "InvalidInstanceID.NotFound":
                    raise
                named = set(_INSTANCE_ID.findall(str(exc))) & set(batch)
                if named:
                    missing |= named
                    todo.append(batch)
                elif len(batch) == 1:
                    missing.add(batch[0])
                else:
                    half = len(batch) // 2
                    todo += [batch[:half], batch[half:]]
        return results, missing

    def describe(self, handles: Iterable[WorkerHandle]) -> dict[str, ResourceState]:
        handles = list(handles)
        states: dict[str, str] = {}
        ids = list(dict.fromkeys(h.provider_id for h in handles))
        try:
            for batch in _chunks(ids, ID_BATCH):
                pages, _ = self._dropping_missing(
                    batch, lambda b: list(self._describe_pages(InstanceIds=b))
                )
                for instances in pages:
                    states.update((i["InstanceId"], i["State"]["Name"]) for i in instances)
        except (ClientError, BotoCoreError) as exc:
            raise translate_error(exc, "DescribeInstances") from exc
        now = time.monotonic()
        with self._lock:
            recent = {i for i, t in self._launched.items() if now - t < LAUNCH_VISIBILITY_GRACE_S}
            self._launched = {i: self._launched[i] for i in recent}
        result = {}
        for handle in handles:
            state = states.get(handle.provider_id)
            if state is None and handle.provider_id in recent:
                result[handle.worker_id] = ResourceState.PENDING
            else:
                result[handle.worker_id] = STATE_MAP.get(state or "", ResourceState.GONE)
        return result

    def list_owned(self, deployment_id: str) -> list[WorkerHandle]:
        filters = [
            {"Name": f"tag:{TAG_DEPLOYMENT}", "Values": [deployment_id]},
            {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
        ]
        handles = []
        try:
            for instance in self._describe_pages(Filters=filters, MaxResults=1000):
                tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                if TAG_WORKER not in tags:
                    log.warning(
                        "ec2_list_untagged deployment=%s instance=%s",
                        deployment_id,
                        instance["InstanceId"],
                    )
                    continue
                handles.append(self._handle(instance, tags[TAG_WORKER], tags.get(TAG_POOL, "")))
        except (ClientError, BotoCoreError) as exc:
            raise translate_error(exc, "DescribeInstances") from exc
        return handles


def client_token(worker_id: str, market: str, instance_type: str | None, subnet: str | None) -> str:
    """RunInstances' idempotency token: one per worker and placement, at most 64 chars.

    EC2 rejects a token reused with different parameters (IdempotentParameterMismatch),
    so each (market, type, subnet) attempt of one worker gets its own stable token.
    """
    placement = f"{market}|{instance_type}|{subnet}"
    digest = hashlib.sha256(f"{worker_id}|{placement}".encode()).hexdigest()
    readable = re.sub(r"[^A-Za-z0-9-]", "", worker_id)[:40]
    return f"wl-{readable}-{digest[:16]}"[:64]


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
