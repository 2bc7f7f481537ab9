"""What the service answers, as frozen dataclasses; ``raw`` keeps the JSON as it came."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

LEASE_LIVE_STATES = frozenset({"pending", "active"})
TASK_END_STATES = frozenset({"succeeded", "failed", "timed_out", "cancelled", "lost"})


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Pool:
    name: str
    os: str
    description: str
    capabilities: list[str]
    lease_idle_timeout_s: int
    lease_max_lifetime_s: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Pool:
        return cls(
            name=str(data["name"]),
            os=str(data.get("os", "")),
            description=str(data.get("description", "")),
            capabilities=[str(c) for c in data.get("capabilities") or []],
            lease_idle_timeout_s=int(data.get("lease_idle_timeout_s") or 0),
            lease_max_lifetime_s=int(data.get("lease_max_lifetime_s") or 0),
            raw=data,
        )


@dataclass(frozen=True)
class Worker:
    id: str
    pool: str
    os: str
    address: str | None
    agent_url: str | None
    access_token: str | None = field(repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Worker:
        return cls(
            id=str(data["id"]),
            pool=str(data.get("pool", "")),
            os=str(data.get("os", "")),
            address=_str(data.get("address")),
            agent_url=_str(data.get("agent_url")),
            access_token=_str(data.get("access_token")),
        )


@dataclass(frozen=True)
class LeaseInfo:
    """A lease as the service last showed it. ``existing``: the service answered a
    lease request with a live lease the tenant already held (200), not a new one."""

    id: str
    pool: str
    state: str
    created_at: datetime | None
    activated_at: datetime | None
    idle_expires_at: datetime | None
    expires_at: datetime | None
    ended_at: datetime | None
    end_reason: str | None
    worker: Worker | None
    raw: dict[str, Any] = field(repr=False, compare=False)
    existing: bool = False
    # The service's clock when it answered (its ``Date`` header; whole seconds).
    server_time: datetime | None = field(default=None, repr=False, compare=False)
    # Our clock when the answer came.
    received_at: datetime | None = field(default=None, repr=False, compare=False)

    @property
    def live(self) -> bool:
        return self.state in LEASE_LIVE_STATES

    @classmethod
    def from_json(
        cls,
        data: dict[str, Any],
        *,
        existing: bool = False,
        server_time: datetime | None = None,
        received_at: datetime | None = None,
    ) -> LeaseInfo:
        worker = data.get("worker")
        return cls(
            id=str(data["id"]),
            pool=str(data.get("pool", "")),
            state=str(data.get("state", "")),
            created_at=parse_time(data.get("created_at")),
            activated_at=parse_time(data.get("activated_at")),
            idle_expires_at=parse_time(data.get("idle_expires_at")),
            expires_at=parse_time(data.get("expires_at")),
            ended_at=parse_time(data.get("ended_at")),
            end_reason=_str(data.get("end_reason")),
            worker=Worker.from_json(worker) if isinstance(worker, dict) else None,
            raw=data,
            existing=existing,
            server_time=server_time,
            received_at=received_at,
        )


@dataclass(frozen=True)
class TaskInfo:
    id: str
    lease_id: str
    state: str
    exit_code: int | None
    error: str | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    shell: str | None
    timeout_s: int | None
    image: str | None
    log_bytes: int | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def ended(self) -> bool:
        return self.state in TASK_END_STATES

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskInfo:
        container = data.get("container")
        image = container.get("image") if isinstance(container, dict) else None
        return cls(
            id=str(data["id"]),
            lease_id=str(data.get("lease_id", "")),
            state=str(data.get("state", "")),
            exit_code=_int(data.get("exit_code")),
            error=_str(data.get("error")),
            created_at=parse_time(data.get("created_at")),
            started_at=parse_time(data.get("started_at")),
            finished_at=parse_time(data.get("finished_at")),
            shell=_str(data.get("shell")),
            timeout_s=_int(data.get("timeout_s")),
            image=_str(image),
            log_bytes=_int(data.get("log_bytes")),
            raw=data,
        )


@dataclass(frozen=True)
class LogChunk:
    """One answer of the log endpoint: ``data`` from ``offset``; ``next_offset`` to ask next."""

    data: bytes
    offset: int
    next_offset: int
    state: str


@dataclass(frozen=True)
class Result:
    """A finished task: ``exit_code`` is None when the script did not exit by itself
    (timed out, cancelled, lost, could not start: ``state`` and ``task.error`` say which)."""

    exit_code: int | None
    state: str
    log: str
    task: TaskInfo

    @property
    def ok(self) -> bool:
        return self.state == "succeeded"
