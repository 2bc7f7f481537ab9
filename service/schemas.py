"""Request and response models: what the API accepts and shows, apart from the tables.

Responses are built from these models only, so a column (a token hash, another
tenant's access token) cannot leak by accident. The OpenAPI document is
generated from them.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from service.config import POOL_NAME_RE

ID_RE = r"^[a-z]-[0-9a-f]{20}$"


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


class LeaseStateFilter(_In):
    state: Literal[
        "pending", "active", "released", "expired", "revoked", "failed", "live", "all"
    ] = "live"


class Page(_In):
    limit: int = Field(default=100, ge=1, le=500)
    offset: int = Field(default=0, ge=0, le=1_000_000)


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


class LeaseOut(BaseModel):
    id: str
    tenant_id: str
    pool: str
    state: str
    created_at: datetime
    activated_at: datetime | None
    idle_expires_at: datetime | None
    expires_at: datetime | None
    ended_at: datetime | None
    end_reason: str | None
    worker: WorkerOut | None


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
    state: str
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


class EventOut(BaseModel):
    id: int
    at: datetime
    kind: str
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
