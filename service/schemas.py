"""Request and response models: what the API accepts and shows, apart from the tables.

Responses are built from these models only, so a column (a token hash, another
tenant's access token) cannot leak by accident. The OpenAPI document is
generated from them.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import unicodedata
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from service.config import POOL_NAME_RE
from service.models import EndReason, LeaseState, WorkerState

ID_RE = r"^[a-z]-[0-9a-f]{20}$"


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Built once per model: flask-openapi3 asks for a query model's schema on every
        request to read its field types (13% of a followed log line's CPU). Its callers
        only read it; the OpenAPI document is the same (tests/api/test_openapi_document)."""
        if args or kwargs:
            return super().model_json_schema(*args, **kwargs)
        cached = cls.__dict__.get("_schema_cache")
        if cached is None:
            cached = super().model_json_schema()
            cls._schema_cache = cached  # type: ignore[attr-defined]
        return cached


class _Body(_In):
    """A JSON body: types as declared (no ``true`` or ``"5"`` for a number)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _no_invisible_characters(value: str) -> str:
    """Refuse what makes a name display as something else: control, format (bidi,
    zero-width), line/paragraph separators, surrogates, private-use, unassigned."""
    for char in value:
        category = unicodedata.category(char)
        if category[0] == "C" or category in ("Zl", "Zp"):
            raise ValueError(f"must not contain the character U+{ord(char):04X} ({category})")
    return value


PrintableName = Annotated[str, AfterValidator(_no_invisible_characters)]


class ProblemError(BaseModel):
    loc: list[str] = Field(description="Where: e.g. body, pool")
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    # Error answers are sent as application/problem+json; declaring only the
    # default application/json would leave them unchecked by schema validators.
    model_config = ConfigDict(
        openapi_extra={  # type: ignore[typeddict-unknown-key]
            "content": {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            }
        }
    )

    type: str = "about:blank"
    status: int
    title: str
    detail: str
    errors: list[ProblemError] | None = Field(
        default=None, description="422: each problem of the request, where and what"
    )


# ---- requests ---------------------------------------------------------------


class LeaseCreate(_Body):
    pool: str = Field(pattern=POOL_NAME_RE, description="Name of the pool to lease from")
    wait_seconds: int = Field(
        default=0,
        ge=0,
        le=60,
        description="Wait up to this long for a worker before answering; keep waiting "
        "afterwards with GET /v1/leases/{id}?wait_seconds=N",
    )


class LeaseWait(_In):
    wait_seconds: int = Field(
        default=0, ge=0, le=60, description="While the lease is pending, wait up to this long"
    )


class LeasePath(_In):
    lease_id: str = Field(pattern=ID_RE)


class WorkerPath(_In):
    worker_id: str = Field(pattern=ID_RE)


class TenantPath(_In):
    tenant_id: str = Field(pattern=ID_RE)


class PoolPath(_In):
    name: str = Field(pattern=POOL_NAME_RE)


class Page(_In):
    limit: int = Field(default=100, ge=1, le=500)
    offset: int = Field(default=0, ge=0, le=1_000_000)

    def next_offset(self, returned: int) -> int | None:
        """Where the next page starts; None when this one was the last."""
        return self.offset + returned if returned == self.limit else None


class LeaseStateFilter(Page):
    state: Literal[
        "pending", "active", "released", "expired", "revoked", "failed", "live", "all"
    ] = "live"


class AdminLeaseQuery(Page):
    tenant: str | None = Field(default=None, pattern=ID_RE)
    pool: str | None = Field(default=None, pattern=POOL_NAME_RE)
    state: Literal[
        "pending", "active", "released", "expired", "revoked", "failed", "live", "all"
    ] = "all"


class AdminWorkerQuery(Page):
    pool: str | None = Field(default=None, pattern=POOL_NAME_RE)
    state: Literal[
        "provisioning", "ready", "leased", "destroying", "destroyed", "failed", "live", "all"
    ] = "all"


class EventQuery(_In):
    limit: int = Field(default=100, ge=1, le=1000)
    # Bounded by the column (INTEGER, 32 bits on PostgreSQL): a larger value made the
    # database driver fail (a 500) instead of being refused as a bad query value.
    before: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="Cursor: events older than this id"
    )


# Text that is stored: no control characters (PostgreSQL refuses NUL in text, a 500).
PRINTABLE_RE = r"^[^\x00-\x1f\x7f]*$"


class TenantCreate(_Body):
    name: PrintableName = Field(min_length=1, max_length=200, pattern=PRINTABLE_RE)


class PoolPatch(_Body):
    min_ready: int | None = Field(default=None, ge=0, le=100_000)
    max_workers: int | None = Field(default=None, ge=0, le=100_000)
    enabled: bool | None = None


class WorkerReady(_Body):
    agent_url: str = Field(min_length=8, max_length=500, pattern=r"^https?://[^\x00-\x1f\x7f]*$")
    address: str | None = Field(default=None, max_length=255, pattern=PRINTABLE_RE)


# ---- responses --------------------------------------------------------------


class WorkerOut(BaseModel):
    id: str
    pool: str
    os: str
    address: str | None
    agent_url: str | None
    access_token: str | None = Field(description="Shown only to the lease's tenant")


class WaitingKind(enum.StrEnum):
    WORKER_ON_ITS_WAY = "worker_on_its_way"
    PROVISIONER_DEGRADED = "provisioner_degraded"
    POOL_AT_MAX_WORKERS = "pool_at_max_workers"
    QUEUED_BEHIND = "queued_behind"


class WaitingReason(BaseModel):
    """Why a pending lease waits; absent on a lease that does not wait."""

    kind: WaitingKind
    detail: str = Field(description="The same, in a sentence for people")
    leases_ahead: int = Field(description="Pending leases of the pool served before this one")
    workers_on_the_way: int = Field(description="The pool's workers starting or just ready")
    time_to_worker_s: float | None = Field(
        description="Mean time from create to ready of the pool's live workers"
    )
    degraded_reason: str | None = Field(description="Why the pool's provisioner is failing")


class LeaseOut(BaseModel):
    id: str
    tenant_id: str
    pool: str
    state: LeaseState
    created_at: datetime
    activated_at: datetime | None
    idle_expires_at: datetime | None
    expires_at: datetime | None
    ended_at: datetime | None
    end_reason: EndReason | None
    worker: WorkerOut | None
    waiting_reason: WaitingReason | None = Field(
        default=None, description="Why the lease is still pending (pending leases only)"
    )


class LeaseList(BaseModel):
    leases: list[LeaseOut]
    next_offset: int | None = None


class PoolOut(BaseModel):
    name: str
    os: str
    description: str
    capabilities: list[str]
    lease_idle_timeout_s: int
    lease_max_lifetime_s: int


class PoolList(BaseModel):
    pools: list[PoolOut]


class WarmTargetOut(BaseModel):
    """How many ready workers the pool keeps now, and why (docs/capacity.md)."""

    policy: str = Field(description="fixed (min_ready) or adaptive (follows demand)")
    target: int = Field(description="Ready workers the refill keeps (plus pending leases)")
    keep: int = Field(
        description="Ready workers trim keeps: the target's highest value over the scale-down delay"
    )
    min_ready: int
    schedule_min_ready: int = Field(description="Floor set by an open schedule window, or 0")
    schedule: str | None = Field(description="The cron of the window that sets that floor")
    rate_per_min: float | None = Field(description="Lease requests per minute (EWMA), adaptive")
    provision_mean_s: float | None = Field(
        description="Mean of the last 50 provisioning times, adaptive"
    )
    demand_target: int | None = Field(
        description="What the demand alone asks for (Poisson quantile at warm_hit_target)"
    )
    hit_target: float
    reason: str


class AdminPoolOut(PoolOut):
    provisioner: str
    enabled: bool
    min_ready: int
    max_workers: int
    provision_timeout_s: int
    pending_timeout_s: int
    degraded_reason: str | None = Field(description="Why creates are failing, if they are")
    destroy_error: str | None = Field(
        default=None,
        description="A permanent destroy failure: resources may be leaking until fixed",
    )
    warning: str | None = Field(
        default=None,
        description="What the pool's provisioner says an operator must know, e.g. that "
        "its workers are not isolated from the service",
    )
    counts: dict[str, int]
    warm: WarmTargetOut | None = None


class AdminPoolList(BaseModel):
    pools: list[AdminPoolOut]


class TenantOut(BaseModel):
    id: str
    name: str
    enabled: bool
    created_at: datetime
    disabled_at: datetime | None


class TenantCreated(BaseModel):
    id: str
    name: str
    token: str = Field(description="Shown once; only its hash is stored")
    created_at: datetime


class TenantList(BaseModel):
    tenants: list[TenantOut]
    next_offset: int | None = None


class AdminWorkerOut(BaseModel):
    id: str
    pool: str
    state: WorkerState
    created_at: datetime
    state_changed_at: datetime
    ready_at: datetime | None
    provider_id: str | None
    address: str | None
    agent_url: str | None
    destroy_attempts: int
    last_error: str | None
    lease_id: str | None


class AdminWorkerList(BaseModel):
    workers: list[AdminWorkerOut]
    next_offset: int | None = None


# The subjects of audit events (service/states.py: each move_* and record() call names one).
EventKind = Literal["worker", "lease", "tenant", "pool", "task"]


class EventOut(BaseModel):
    id: int
    at: datetime
    kind: EventKind
    subject_id: str
    from_state: str | None
    to_state: str | None
    reason: str
    pool: str | None
    tenant_id: str | None


class EventList(BaseModel):
    events: list[EventOut]
    next_before: int | None = None


class ReadyAck(BaseModel):
    access_token: str
    # The agent's credential for its task endpoints (poll, log, finish); shown once.
    worker_token: str


# ---- tasks (docs/tasks.md) --------------------------------------------------------

MAX_SCRIPT_BYTES = 1 << 20
MAX_ENV_VARS = 64
MAX_ENV_VALUE_BYTES = 32 << 10
MAX_FILES_BYTES = 10 << 20
MAX_FILES = 1000
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A registry reference: no leading "-" (it would be read as an option of docker run).
IMAGE_RE = r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,299}$"
TASK_ID_RE = ID_RE
Shell = Literal["sh", "bash", "powershell", "cmd"]
TaskStateName = Literal[
    "queued", "running", "succeeded", "failed", "timed_out", "cancelled", "lost"
]


def _bounded_script(value: str) -> str:
    if len(value.encode()) > MAX_SCRIPT_BYTES:
        raise ValueError(f"must be at most {MAX_SCRIPT_BYTES} bytes (UTF-8)")
    return value


def check_relative_path(path: str) -> str:
    """A path under the task's directory: relative, ``/``-separated, no way out of it."""
    if not path or len(path) > 255:
        raise ValueError("a file path must be 1..255 characters")
    if "\\" in path or ":" in path or "\x00" in path:
        raise ValueError(f"{path!r}: backslashes, drive letters and NUL are not allowed")
    if path.startswith("/"):
        raise ValueError(f"{path!r}: absolute paths are not allowed")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{path!r}: empty, '.' and '..' segments are not allowed")
    return path


class ContainerSpec(_Body):
    image: str = Field(pattern=IMAGE_RE, description="Image to run the script in, e.g. alpine:3.20")


class TaskCreate(_Body):
    script: Annotated[str, AfterValidator(_bounded_script)] = Field(
        min_length=1, description="The script, run by `shell` (at most 1 MiB)"
    )
    shell: Shell | None = Field(
        default=None, description="Default: sh on linux/ubuntu pools, powershell on windows"
    )
    timeout_s: int = Field(default=3600, ge=1, le=86400)
    env: dict[str, str] = Field(
        default_factory=dict, description="At most 64 variables; never returned or logged"
    )
    files: dict[str, str] = Field(
        default_factory=dict,
        description="Relative path -> base64 content, written under the task's directory",
    )
    container: ContainerSpec | None = None

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        if len(env) > MAX_ENV_VARS:
            raise ValueError(f"at most {MAX_ENV_VARS} variables")
        for name, value in env.items():
            if not ENV_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a valid variable name")
            if len(value.encode()) > MAX_ENV_VALUE_BYTES or "\x00" in value:
                raise ValueError(f"{name}: values are at most 32 KiB and hold no NUL")
        return env

    @field_validator("files")
    @classmethod
    def _files(cls, files: dict[str, str]) -> dict[str, str]:
        if len(files) > MAX_FILES:
            raise ValueError(f"at most {MAX_FILES} files")
        total = 0
        for path, content in files.items():
            check_relative_path(path)
            try:
                total += len(base64.b64decode(content, validate=True))
            except (binascii.Error, ValueError):
                raise ValueError(f"{path!r}: content is not valid base64") from None
            if total > MAX_FILES_BYTES:
                raise ValueError(f"at most {MAX_FILES_BYTES} bytes of files in total")
        return files


class TaskPath(_In):
    lease_id: str = Field(pattern=ID_RE)
    task_id: str = Field(pattern=TASK_ID_RE)


class TaskLogQuery(_In):
    offset: int = Field(default=0, ge=0, description="Byte offset to read from")
    wait_seconds: int = Field(
        default=0, ge=0, le=60, description="Wait up to this long for output past offset"
    )


class TaskOut(BaseModel):
    id: str
    lease_id: str
    state: TaskStateName
    exit_code: int | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    shell: Shell
    timeout_s: int
    container: ContainerSpec | None
    log_bytes: int


class TaskList(BaseModel):
    tasks: list[TaskOut]
    next_offset: int | None = None


# ---- the agent's task endpoints (worker token) --------------------------------------


class WorkerPoll(_Body):
    running: list[Annotated[str, Field(pattern=TASK_ID_RE)]] = Field(
        default_factory=list, max_length=256
    )
    wait_seconds: int = Field(default=20, ge=0, le=30)


class TaskAssignment(BaseModel):
    id: str
    script: str
    shell: Shell
    timeout_s: int
    env: dict[str, str]
    files: dict[str, str]
    container: ContainerSpec | None


class PollAnswer(BaseModel):
    tasks: list[TaskAssignment]
    cancel: list[str]


class WorkerTaskPath(_In):
    worker_id: str = Field(pattern=ID_RE)
    task_id: str = Field(pattern=TASK_ID_RE)


class LogChunkQuery(_In):
    offset: int = Field(ge=0)


class LogAck(BaseModel):
    received: int
    cancel: bool
    discard: bool


class TaskFinish(_Body):
    outcome: Literal["exited", "timed_out", "cancelled", "failed_to_start"]
    exit_code: int | None = None
    error: str | None = Field(default=None, max_length=2000)
    log_bytes: int = Field(ge=0)


class TaskFinished(BaseModel):
    state: TaskStateName
