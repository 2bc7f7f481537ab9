"""Database tables. Request/response shapes live in ``service.schemas``, never here.

The two leasing invariants are indexes, so no race can break them:

* ``uq_lease_live_tenant_pool``: a tenant holds at most one pending-or-active
  lease per pool (partial unique index on the live states);
* ``uq_lease_worker``: a worker appears in at most one lease, ever (workers are
  never reused, whatever ended the lease).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    TypeDecorator,
    text,
)
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

from service.crypto import EncryptedString, EncryptedText


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both databases (SQLite hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """On SQLite, ``process_bind_param`` and SQLite's ``DATETIME`` text in one function
        (every statement binds a few: ~7 us -> ~3.5 us each); the same text, to the byte."""
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)
        return _sqlite_utc_text

    def result_processor(self, dialect: Dialect, coltype: Any) -> Callable[[Any], Any] | None:
        """On SQLite, the text parsed and marked UTC in one function, as the bind."""
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)
        fallback = super().result_processor(dialect, coltype)
        assert fallback is not None
        return functools.partial(_sqlite_utc_value, fallback)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# The last moment bound and its text: a pass binds its ``now`` to most of its
# statements (about half of a replay's binds repeat the one before; one object, so an
# identity check, and the memo holds it alive so its id is not reused).
_last_bound: tuple[datetime | None, str | None] = (None, None)


def _sqlite_utc_text(value: datetime | None) -> str | None:
    """What SQLAlchemy's SQLite ``DATETIME`` stores of ``process_bind_param``'s naive UTC:
    ``YYYY-MM-DD HH:MM:SS.ffffff``, the microseconds always written."""
    global _last_bound
    if value is None:
        return None
    last, text = _last_bound
    if value is last:
        return text
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    moment = value if value.tzinfo is UTC else value.astimezone(UTC)
    text = moment.isoformat(" ")[:-6]  # "+00:00" off
    if not moment.microsecond:
        text += ".000000"
    _last_bound = (value, text)  # one tuple: a thread reads the pair whole
    return text


def _sqlite_utc_value(fallback: Callable[[Any], Any], value: str | None) -> datetime | None:
    """SQLite's ``DATETIME`` text as an aware UTC datetime in one call: SQLAlchemy's own
    processor parses with ``fromisoformat`` too, then the decorator's wrapper calls
    ``process_result_value``. Text it cannot read goes that way (and fails as there)."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return fallback(value)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class WorkerState(enum.StrEnum):
    PROVISIONING = "provisioning"
    READY = "ready"
    LEASED = "leased"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    FAILED = "failed"


class LeaseState(enum.StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    RELEASED = "released"
    EXPIRED = "expired"
    REVOKED = "revoked"
    FAILED = "failed"


class EndReason(enum.StrEnum):
    RELEASED = "released"
    IDLE_TIMEOUT = "idle_timeout"
    MAX_LIFETIME = "max_lifetime"
    REVOKED = "revoked"
    FAILED = "failed"


class TaskState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    LOST = "lost"


LIVE_LEASE_STATES = (LeaseState.PENDING, LeaseState.ACTIVE)
LIVE_TASK_STATES = (TaskState.QUEUED, TaskState.RUNNING)
# Workers that count against max_workers and that the provisioner should hold.
LIVE_WORKER_STATES = (
    WorkerState.PROVISIONING,
    WorkerState.READY,
    WorkerState.LEASED,
    WorkerState.DESTROYING,
    WorkerState.FAILED,
)


def _state_in(states: tuple[str, ...]) -> str:
    return "state IN (" + ", ".join(f"'{state}'" for state in states) + ")"


# Partial-index predicates. Queries that should use these indexes must render the
# same IN list as literals (``service.api.by_state``): neither SQLite nor a generic
# PostgreSQL plan matches a partial index to bound parameters.
_LIVE_LEASE_SQL = text(_state_in(LIVE_LEASE_STATES))
_LIVE_WORKER_SQL = text(_state_in(LIVE_WORKER_STATES))


def _utc(nullable: bool = False, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


class Tenant(SQLModel, table=True):
    __tablename__ = "tenants"

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=200)
    token_hash: str = Field(max_length=64, unique=True)
    enabled: bool = True
    created_at: datetime = _utc()
    disabled_at: datetime | None = _utc(nullable=True)


class Pool(SQLModel, table=True):
    """A pool's live settings. Config seeds it; PATCH changes the runtime knobs."""

    __tablename__ = "pools"

    name: str = Field(primary_key=True, max_length=63)
    os: str = Field(max_length=20)
    description: str = ""
    provisioner: str = Field(max_length=100)
    options: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    capabilities: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    min_ready: int
    max_workers: int
    enabled: bool = True
    in_config: bool = True
    # The config's own values when last applied: a changed config wins over an
    # earlier PATCH, an unchanged one leaves the operator's PATCH in place.
    config_min_ready: int
    config_max_workers: int
    lease_idle_timeout_s: int
    lease_max_lifetime_s: int
    provision_timeout_s: int
    pending_timeout_s: int
    degraded_reason: str | None = None  # creates are failing (cleared by the next success)
    create_failures: int = 0
    create_backoff_until: datetime | None = _utc(nullable=True)
    # Destroys are failing with a permanent error: resources may be leaking until an
    # operator acts (cleared by the next confirmed destroy in the pool).
    destroy_error: str | None = None
    # What the pool's provisioner says an operator must know (e.g. workers not isolated).
    warning: str | None = None
    max_concurrent_tasks: int = 4  # tasks running at once on one worker; the rest queue
    # How many ready workers to keep (service.capacity); from the config only.
    warm_policy: str = Field(default="fixed", max_length=20)
    warm_hit_target: float = 0.95
    scale_down_delay_s: int = 600
    demand_half_life_s: int = 600
    schedules: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )


class Worker(SQLModel, table=True):
    __tablename__ = "workers"
    __table_args__ = (
        Index("ix_workers_pool_state_ready", "pool", "state", "ready_at"),
        Index("ix_workers_created", "created_at"),
        # The adaptive warm target's provisioning times: a pool's most recent ready_at.
        Index("ix_workers_pool_ready", "pool", "ready_at"),
        # The scheduler's passes select by state: with this index their cost follows the
        # live workers, not the destroyed history. (Not partial: SQLite cannot match a
        # partial index to a bound ``state = ?`` parameter.)
        Index("ix_workers_state_pool", "state", "pool", "created_at"),
        # The admin list of live workers, newest first: its cost follows the live
        # workers, however long the history.
        Index(
            "ix_workers_live_created",
            "created_at",
            sqlite_where=_LIVE_WORKER_SQL,
            postgresql_where=_LIVE_WORKER_SQL,
        ),
    )

    id: str = Field(primary_key=True, max_length=40)
    pool: str = Field(max_length=63, foreign_key="pools.name")
    state: str = Field(max_length=20)
    created_at: datetime = _utc()
    state_changed_at: datetime = _utc()
    ready_at: datetime | None = _utc(nullable=True)
    provider_id: str | None = Field(default=None, max_length=200)
    address: str | None = Field(default=None, max_length=255)
    agent_url: str | None = Field(default=None, max_length=500)
    # Kept until the agent uses it (create must stay retryable after a crash), then cleared.
    bootstrap_token: str | None = Field(
        default=None, sa_column=Column(EncryptedString(), nullable=True)
    )
    access_token: str = Field(sa_column=Column(EncryptedString(), nullable=False))
    # The agent's credential for its task endpoints (poll, log, finish), set by the ready
    # callback. Only its hash is kept: the service never needs to present it.
    worker_token_hash: str | None = Field(default=None, max_length=64)
    create_attempts: int = 0
    destroy_attempts: int = 0
    next_attempt_at: datetime | None = _utc(nullable=True)
    claimed_until: datetime | None = _utc(nullable=True)
    last_error: str | None = Field(default=None, max_length=1000)


class Lease(SQLModel, table=True):
    __tablename__ = "leases"
    __table_args__ = (
        Index(
            "uq_lease_live_tenant_pool",
            "tenant_id",
            "pool",
            unique=True,
            sqlite_where=_LIVE_LEASE_SQL,
            postgresql_where=_LIVE_LEASE_SQL,
        ),
        Index("uq_lease_worker", "worker_id", unique=True),
        Index("ix_leases_state_pool", "state", "pool", "created_at"),
        Index("ix_leases_tenant_created", "tenant_id", "created_at"),
        Index("ix_leases_created", "created_at"),
        # The adaptive warm target's arrival rate: a pool's recent lease requests.
        Index("ix_leases_pool_created", "pool", "created_at"),
        Index(
            "ix_leases_live_created",
            "created_at",
            sqlite_where=_LIVE_LEASE_SQL,
            postgresql_where=_LIVE_LEASE_SQL,
        ),
    )

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(max_length=40, foreign_key="tenants.id")
    pool: str = Field(max_length=63, foreign_key="pools.name")
    state: str = Field(max_length=20)
    worker_id: str | None = Field(default=None, max_length=40, foreign_key="workers.id")
    created_at: datetime = _utc()
    activated_at: datetime | None = _utc(nullable=True)
    idle_expires_at: datetime | None = _utc(nullable=True)
    expires_at: datetime | None = _utc(nullable=True)
    pending_expires_at: datetime | None = _utc(nullable=True)
    ended_at: datetime | None = _utc(nullable=True)
    end_reason: str | None = Field(default=None, max_length=20)


class Task(SQLModel, table=True):
    """A step a tenant runs on its lease's worker; the agent polls for it (docs/tasks.md)."""

    __tablename__ = "tasks"
    __table_args__ = (
        Index("uq_tasks_lease_seq", "lease_id", "seq", unique=True),
        # The agent's poll: its worker's queued and running tasks.
        Index("ix_tasks_worker_state", "worker_id", "state", "created_at"),
        # The sweep: running tasks past their deadlines, ended ones past retention.
        Index("ix_tasks_state_started", "state", "started_at"),
        Index("ix_tasks_finished", "finished_at"),
    )

    id: str = Field(primary_key=True, max_length=40)
    lease_id: str = Field(max_length=40, foreign_key="leases.id")
    seq: int  # 1, 2, ... within the lease: the order tasks were submitted, and run
    tenant_id: str = Field(max_length=40)
    pool: str = Field(max_length=63)
    worker_id: str = Field(max_length=40)
    state: str = Field(max_length=20)
    shell: str = Field(max_length=20)
    timeout_s: int
    container_image: str | None = Field(default=None, max_length=300)
    created_at: datetime = _utc()
    started_at: datetime | None = _utc(nullable=True)
    finished_at: datetime | None = _utc(nullable=True)
    exit_code: int | None = None
    error: str | None = Field(default=None, max_length=1000)
    cancel_requested_at: datetime | None = _utc(nullable=True)
    # What the tenant sent that may hold secrets (script, env, files) as JSON, encrypted
    # like worker tokens and erased when the task ends.
    payload: str | None = Field(default=None, sa_column=Column(EncryptedText(), nullable=True))
    script_sha256: str = Field(max_length=64)
    # Bytes of the agent's output stream the service holds (the agent's offsets), and
    # bytes kept in the log (at most the log limit, plus one marker line).
    received_bytes: int = 0
    log_bytes: int = 0
    log_capped: bool = False


class TaskLogChunk(SQLModel, table=True):
    """A task's output, in the chunks the agent sent; ``offset`` is the kept log's."""

    __tablename__ = "task_log_chunks"

    task_id: str = Field(
        sa_column=Column(String(40), ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    )
    offset: int = Field(primary_key=True)
    data: bytes = Field(sa_column=Column(LargeBinary(), nullable=False))


class Event(SQLModel, table=True):
    """The audit log: one row per state transition and per administrative act."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_subject", "subject_id"),)

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = _utc()
    kind: str = Field(max_length=20)  # worker | lease | tenant | pool
    subject_id: str = Field(max_length=63)
    from_state: str | None = Field(default=None, max_length=20)
    to_state: str | None = Field(default=None, max_length=20)
    reason: str = Field(default="", max_length=500)
    pool: str | None = Field(default=None, max_length=63)
    tenant_id: str | None = Field(default=None, max_length=40)


# The indexes that only the HTTP listings read (the admin's and a tenant's pages, newest
# first, and the audit log by subject): no pass, lease, release or agent call goes
# through them, and none is unique (the invariants' indexes are not among them). A
# replay's private database goes without them (``workerlease simulate``: their upkeep on
# every insert and state change was ~10 % of a replayed request).
LISTING_INDEXES = (
    "ix_workers_created",
    "ix_workers_live_created",
    "ix_leases_created",
    "ix_leases_live_created",
    "ix_leases_tenant_created",
    "ix_events_subject",
)


class Installation(SQLModel, table=True):
    """This database's one random id, made by migration 0005 and never changed."""

    __tablename__ = "installation"

    id: str = Field(primary_key=True, max_length=40)


class Heartbeat(SQLModel, table=True):
    """Last sign of life of a background process (the scheduler), for ``/readyz``."""

    __tablename__ = "heartbeats"

    name: str = Field(primary_key=True, max_length=100)
    at: datetime = _utc()
    detail: str = Field(default="", max_length=200)
