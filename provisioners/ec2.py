"""EC2 provisioner: one EC2 instance per worker, found again by its tags.

Ownership lives in instance and volume tags (``workerlease:deployment``,
``workerlease:pool``, ``workerlease:worker``; EC2 tag keys conventionally use
``:`` where other platforms use ``.``). ``create`` looks for an instance tagged
with the worker id before launching, so a crash between launch and the service
recording the result never starts a second machine; the ``ClientToken`` gives
the same guarantee on real EC2 when the tag lookup has not caught up yet
(DescribeInstances is eventually consistent).

The instance's user data writes the agent environment (with the one-time
bootstrap token, never an access token), unpacks the agent embedded in it and
runs the agent's own installer (``images/agent/install.sh --service``, or
``install.ps1``, which always registers and starts the agent's task).
:func:`render_user_data` is the single place that builds it.

Every EC2 request (botocore's retries included) passes a client-side rate limiter
shared by all pools of the process that talk to the same region and endpoint, so
a refill burst does not drain the account's EC2 token buckets (which other tools
in the account share).
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.resources
import logging
import re
import shlex
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
)
from pydantic import BaseModel, ConfigDict, Field, model_validator

from provisioners.base import (
    CapacityError,
    PermanentProvisionerError,
    Provisioner,
    ProvisionerError,
    ProvisionerOptions,
    ResourceState,
    TransientProvisionerError,
    WorkerHandle,
    WorkerSpec,
)

log = logging.getLogger(__name__)

TAG_DEPLOYMENT = "workerlease:deployment"
TAG_POOL = "workerlease:pool"
TAG_WORKER = "workerlease:worker"
RESERVED_TAG_PREFIXES = ("workerlease:", "aws:")

DEFAULT_AGENT_PORT = 8750
USER_DATA_LIMIT = 16 * 1024  # EC2 limit on raw user data, before base64
ID_BATCH = 1000  # TerminateInstances / DescribeInstances accept up to 1000 ids
LIVE_STATES = ("pending", "running", "stopping", "stopped")
# A worker whose instance is going away is still "its" instance for create(): launching
# a second machine under the same worker id would leave two resources for one row.
NOT_TERMINATED_STATES = (*LIVE_STATES, "shutting-down")
STATE_MAP = {"pending": ResourceState.PENDING, "running": ResourceState.RUNNING}
# DescribeInstances may not know an instance for a few seconds after RunInstances.
LAUNCH_VISIBILITY_GRACE_S = 60.0

# Errors after which another (market, instance type, subnet) may still succeed.
CAPACITY_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "InsufficientFreeAddressesInSubnet",
        "Unsupported",  # instance type not offered in this AZ
        "SpotMaxPriceTooLow",
        "MaxSpotInstanceCountExceeded",
        # Account quotas: another type may fall under another quota; if none does, the
        # resulting CapacityError is transient because destroying workers frees quota.
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
    }
)
TRANSIENT_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
        "RequestTimeout",
    }
)
_INSTANCE_ID = re.compile(r"\bi-[0-9a-f]+\b")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_AGENT_FILES = {
    "linux": ("workerlease_agent.py", "install.sh"),
    "windows": ("workerlease_agent.py", "install.ps1"),
}

T = TypeVar("T")


# --------------------------------------------------------------------------- options


class LaunchTemplateRef(BaseModel):
    """A launch template by id or by name, and the version to launch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = None
    name: str | None = None
    version: str = "$Default"

    @model_validator(mode="after")
    def _one_reference(self) -> LaunchTemplateRef:
        if (self.id is None) == (self.name is None):
            raise ValueError("give exactly one of 'id' or 'name'")
        return self

    def as_param(self) -> dict[str, str]:
        key = "LaunchTemplateId" if self.id else "LaunchTemplateName"
        return {key: self.id or self.name or "", "Version": self.version}


class EC2Options(ProvisionerOptions):
    """A pool's ``options`` for ``provisioner: ec2``."""

    region: str
    endpoint_url: str | None = None  # AWS_ENDPOINT_URL_EC2 works too (botocore)
    # The image: image_id, or a launch template that names one (image_id then overrides it).
    image_id: str | None = None
    launch_template: LaunchTemplateRef | None = None
    # Tried in order; empty means "whatever the launch template says".
    instance_types: tuple[str, ...] = ()
    subnet_ids: tuple[str, ...] = ()
    security_group_ids: tuple[str, ...] = ()
    iam_instance_profile: str | None = None  # name or ARN
    key_name: str | None = None
    root_volume_gb: int | None = Field(default=None, ge=1, le=16384)
    root_device_name: str = "/dev/sda1"  # Ubuntu and Windows AMIs; Amazon Linux uses /dev/xvda
    market: Literal["on-demand", "spot", "spot-then-on-demand"] = "on-demand"
    user_data_extra: str = ""  # appended to the boot script (shell or PowerShell)
    tags: dict[str, str] = Field(default_factory=dict)
    # "running": the image has no agent; the worker is ready once the instance runs.
    ready_when: Literal["agent", "running"] = "agent"
    os: Literal["linux", "windows"] | None = None  # default: from the pool's os
    agent_port: int = Field(default=DEFAULT_AGENT_PORT, ge=1, le=65535)
    max_attempts: int = Field(default=5, ge=1, le=20)  # botocore adaptive retries per call
    throttle_max_wait_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> EC2Options:
        if self.image_id is None and self.launch_template is None:
            raise ValueError("give image_id, launch_template, or both")
        if self.launch_template is None and not self.instance_types:
            raise ValueError("instance_types is required without a launch_template")
        reserved = [k for k in self.tags if k.startswith(RESERVED_TAG_PREFIXES)]
        if reserved:
            raise ValueError(f"tags may not use reserved keys: {', '.join(sorted(reserved))}")
        return self


# --------------------------------------------------------------------------- user data


def agent_files(os_family: str) -> dict[str, bytes]:
    """The agent and its installer for ``os_family`` (``linux`` or ``windows``)."""
    root = importlib.resources.files("images.agent")
    files = {}
    for name in _AGENT_FILES[os_family]:
        try:
            files[name] = root.joinpath(name).read_bytes()
        except (FileNotFoundError, OSError) as exc:
            raise PermanentProvisionerError(
                f"agent file images/agent/{name} is missing from this installation"
            ) from exc
    return files


def render_user_data(
    env: Mapping[str, str],
    os_family: str,
    files: Mapping[str, bytes],
    extra: str = "",
) -> str:
    """The boot script: write ``files`` to a staging directory, run the installer.

    ``env`` is the agent environment (it holds the one-time bootstrap token and
    must never hold an access token). ``files`` must include the installer for
    ``os_family`` (``install.sh`` or ``install.ps1``); it is run from the staging
    directory with ``env`` in its environment and the instance's private IP as
    ``WORKERLEASE_AGENT_ADVERTISE_HOST``, read from IMDSv2. An empty ``files``
    renders only ``extra``.
    """
    for key, value in env.items():
        # install.sh / install.ps1 refuse quotes and newlines too; failing here names the key
        # instead of leaving an instance whose agent never calls back.
        if not _ENV_NAME.match(key) or "'" in value or "\n" in value or "\r" in value:
            raise PermanentProvisionerError(
                f"agent environment {key!r}: names are [A-Za-z_][A-Za-z0-9_]*, "
                "values may not contain quotes or newlines"
            )
    render = _render_powershell if os_family == "windows" else _render_shell
    return render(env, files, extra)


def _packed(data: bytes) -> str:
    # mtime=0 keeps the output stable, so identical specs give identical user data.
    return base64.b64encode(gzip.compress(data, compresslevel=9, mtime=0)).decode("ascii")


def _render_shell(env: Mapping[str, str], files: Mapping[str, bytes], extra: str) -> str:
    lines = ["#!/bin/bash", "# workerlease worker bootstrap (provisioners.ec2.render_user_data)"]
    if files:
        lines += [
            "set -euo pipefail",
            "umask 077",
            "stage=/run/workerlease-bootstrap",
            'mkdir -p "$stage" && cd "$stage"',
        ]
        for name, data in files.items():
            lines += [
                f"base64 -d <<'WL_EOF' | gunzip > {shlex.quote(name)}",
                _packed(data),
                "WL_EOF",
            ]
        lines += [f"export {key}={shlex.quote(value)}" for key, value in sorted(env.items())]
        lines += [
            "imds=http://169.254.169.254/latest",
            "tok=$(curl -sf -m 5 --retry 3 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300'"
            ' "$imds/api/token" || true)',
            'if [ -n "$tok" ]; then',
            "  WORKERLEASE_AGENT_ADVERTISE_HOST=$(curl -sf -m 5"
            ' -H "X-aws-ec2-metadata-token: $tok" "$imds/meta-data/local-ipv4" || true)',
            "  export WORKERLEASE_AGENT_ADVERTISE_HOST",
            "fi",
            "sh install.sh --service",
            'cd / && rm -rf "$stage"',
        ]
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


def _ps_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _render_powershell(env: Mapping[str, str], files: Mapping[str, bytes], extra: str) -> str:
    lines = ["<powershell>", "# workerlease worker bootstrap (provisioners.ec2.render_user_data)"]
    if files:
        lines += [
            "$ErrorActionPreference = 'Stop'",
            "$stage = Join-Path $env:ProgramData 'workerlease-bootstrap'",
            "New-Item -ItemType Directory -Force -Path $stage | Out-Null",
            "function Expand-WorkerleaseFile([string]$Packed, [string]$Name) {",
            "  $in = New-Object IO.MemoryStream(,[Convert]::FromBase64String($Packed))",
            "  $gz = New-Object IO.Compression.GZipStream($in, [IO.Compression.CompressionMode]::Decompress)",  # noqa: E501
            "  $out = [IO.File]::Create((Join-Path $stage $Name))",
            "  try { $gz.CopyTo($out) } finally { $out.Close(); $gz.Close() }",
            "}",
        ]
        lines += [
            f"Expand-WorkerleaseFile {_ps_quote(_packed(data))} {_ps_quote(name)}"
            for name, data in files.items()
        ]
        lines += [f"$env:{key} = {_ps_quote(value)}" for key, value in sorted(env.items())]
        lines += [
            "try {",
            "  $tok = Invoke-RestMethod -Method Put -TimeoutSec 5"
            " -Uri 'http://169.254.169.254/latest/api/token'"
            " -Headers @{'X-aws-ec2-metadata-token-ttl-seconds' = '300'}",
            "  $env:WORKERLEASE_AGENT_ADVERTISE_HOST = Invoke-RestMethod -TimeoutSec 5"
            " -Uri 'http://169.254.169.254/latest/meta-data/local-ipv4'"
            " -Headers @{'X-aws-ec2-metadata-token' = $tok}",
            "} catch { Write-Warning 'IMDSv2 unavailable: advertise host not set' }",
            "& powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass"
            " -File (Join-Path $stage 'install.ps1')",
            'if ($LASTEXITCODE -ne 0) { throw "install.ps1 failed: $LASTEXITCODE" }',
            "Remove-Item -Recurse -Force $stage",
        ]
    if extra:
        lines.append(extra)
    lines.append("</powershell>")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- throttling


class RateLimiter:
    """At most ``calls`` calls start in any ``period`` seconds; callers queue in order.

    A classic token bucket of size b refilled at r/s admits b + r*T calls in a
    window of T seconds, so it cannot promise "at most 2 per second" with a
    burst of 2. This is the stricter variant: a bucket of ``calls`` tokens in
    which each token comes back ``period`` seconds after it was spent. Each
    caller reserves its start time under the lock, then sleeps outside it, so
    waiting threads are served first come, first served and none starves.
    """

    def __init__(
        self,
        calls: int,
        period: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.calls = calls
        self.period = period
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._starts: deque[float] = deque(maxlen=calls)

    def acquire(self, max_wait: float) -> None:
        """Wait for a turn; raise TransientProvisionerError if it is over ``max_wait`` away."""
        with self._lock:
            now = self._clock()
            start = now
            if self._starts:
                start = max(start, self._starts[-1])
            if len(self._starts) == self.calls:
                start = max(start, self._starts[0] + self.period)
            if start - now > max_wait:
                raise TransientProvisionerError(
                    f"client-side EC2 rate limit: next slot in {start - now:.1f}s "
                    f"(> {max_wait:.0f}s); too many calls queued"
                )
            self._starts.append(start)
        if start > now:
            self._sleep(start - now)


@dataclass(frozen=True)
class _Budget:
    calls: int
    period: float


# Budgets per API family. EC2 throttles per account and region with token buckets
# (https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html): the
# RunInstances resource bucket refills 2 instances/s, mutating actions refill about
# 5 requests/s, non-mutating (Describe*) about 20/s. We stay at or below the refill
# rates, because the buckets are shared with every other tool in the account. The
# 50 ms added to each period absorbs thread wake-up jitter, so calls observed on the
# wire also stay within the budget.
BUDGETS: dict[str, _Budget] = {
    "run": _Budget(calls=2, period=1.05),
    "terminate": _Budget(calls=5, period=1.05),
    "describe": _Budget(calls=20, period=1.05),
}
# The operations this provisioner sends, and the budget each draws from.
FAMILY_OF_OPERATION = {
    "RunInstances": "run",
    "TerminateInstances": "terminate",
    "DescribeInstances": "describe",
}
_limiters: dict[tuple[str, str, str], RateLimiter] = {}
_limiters_lock = threading.Lock()


def rate_limiter(region: str, endpoint_url: str | None, family: str) -> RateLimiter:
    """The process-wide limiter for one API family in one region and endpoint."""
    key = (region, endpoint_url or "", family)
    with _limiters_lock:
        limiter = _limiters.get(key)
        if limiter is None:
            budget = BUDGETS[family]
            limiter = _limiters[key] = RateLimiter(budget.calls, budget.period)
        return limiter


# --------------------------------------------------------------------------- errors


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def translate_error(exc: Exception, action: str) -> ProvisionerError:
    """Map a botocore exception to the provisioner's error classes."""
    if isinstance(exc, ProvisionerError):
        return exc
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        message = exc.response.get("Error", {}).get("Message", "")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        text = f"{action} failed: {code}: {message}"
        if code in CAPACITY_CODES:
            return CapacityError(text)
        if code in TRANSIENT_CODES or status >= 500:
            return TransientProvisionerError(text)
        return PermanentProvisionerError(text)
    if isinstance(
        exc, NoCredentialsError | PartialCredentialsError | NoRegionError | ParamValidationError
    ):
        return PermanentProvisionerError(f"{action} failed: {exc}")
    if isinstance(exc, BotoCoreError):  # connection refused, timeouts, closed connections
        return TransientProvisionerError(f"{action} failed: {exc}")
    return PermanentProvisionerError(f"{action} failed: {type(exc).__name__}: {exc}")


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------- provisioner


class EC2Provisioner(Provisioner[EC2Options]):
    """Workers are EC2 instances; see the module docstring for ownership and throttling."""

    name = "ec2"
    Options = EC2Options
    destroy_batch_size = ID_BATCH  # TerminateInstances takes up to 1000 ids

    def __init__(self, pool: str, options: EC2Options) -> None:
        super().__init__(pool, options)
        self._lock = threading.Lock()
        self._client: Any = None
        # instance id -> monotonic launch time, to bridge DescribeInstances' lag.
        self._launched: dict[str, float] = {}

    # -- plumbing

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
        """One EC2 call (rate limited per request); botocore exceptions pass through."""
        result: dict[str, Any] = getattr(self.client(), operation)(**params)
        return result

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
        return WorkerHandle(
            worker_id=worker_id,
            pool=pool,
            provider_id=instance["InstanceId"],
            address=instance.get("PrivateIpAddress"),
        )

    @property
    def ready_when_running(self) -> bool:
        return self.options.ready_when == "running"

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- create

    def create(self, spec: WorkerSpec) -> WorkerHandle:
        try:
            existing = self._find_instance(spec)
        except (ClientError, BotoCoreError) as exc:
            raise translate_error(exc, "DescribeInstances") from exc
        if existing is not None:
            log.info(
                "ec2.create.found_existing",
                extra={"pool": spec.pool, "worker": spec.worker_id, "instance": existing},
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
                code = _error_code(exc) if isinstance(exc, ClientError) else "?"
                where = f"{market}/{instance_type or 'template'}/{subnet or 'default'}"
                tried.append(f"{where}: {code}")
                log.info(
                    "ec2.create.no_capacity",
                    extra={"pool": spec.pool, "worker": spec.worker_id, "tried": tried[-1]},
                )
                continue
            instance = response["Instances"][0]
            with self._lock:
                self._launched[instance["InstanceId"]] = time.monotonic()
            log.info(
                "ec2.create.launched",
                extra={
                    "pool": spec.pool,
                    "worker": spec.worker_id,
                    "instance": instance["InstanceId"],
                    "market": market,
                    "instance_type": instance_type,
                    "subnet": subnet,
                },
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
                "ec2.create.duplicates",
                extra={"worker": spec.worker_id, "instances": [i["InstanceId"] for i in found]},
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

    # -- destroy

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
                    log.info("ec2.destroy.already_gone", extra={"instances": sorted(missing)})
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
                if _error_code(exc) != "InvalidInstanceID.NotFound":
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

    # -- describe / list

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
                    log.warning("ec2.list.untagged", extra={"instance": instance["InstanceId"]})
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
