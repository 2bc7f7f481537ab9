"""The service configuration: one YAML file, validated before anything starts.

Unknown keys and bad values are refused with the dotted name of the key, so an
operator sees ``pools.0.min_ready: ...`` instead of a traceback. Secrets may
come from the environment, which wins over the file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
POOL_NAME_RE = r"^[a-z0-9][a-z0-9-]{0,62}$"


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the offending key."""


def parse_duration(value: Any) -> int:
    """Seconds from an int or a string such as ``90s``, ``60m``, ``72h``, ``3d``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '60m'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return value
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return int(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]
    raise ValueError(f"invalid duration {value!r}; use seconds or e.g. '90s', '60m', '72h', '3d'")


Duration = Annotated[int, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerConfig(_Strict):
    enabled: bool = True
    interval: Duration = 5
    reconcile_interval: Duration = 60
    # How often pending leases are checked against workers on their way (seconds).
    demand_interval: float = Field(default=0.2, ge=0.05, le=60)
    max_concurrent_creates: int = Field(default=4, ge=1, le=64)
    # Leases ring the scheduler (a new pending lease, a warm take); off: the polls alone.
    doorbell: bool = True

    @field_validator("interval", "reconcile_interval")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1 second")
        return value


class ScheduleConfig(_Strict):
    """A window that raises the pool's floor: from each cron fire time, for ``duration``."""

    cron: str
    duration: Duration
    min_ready: int = Field(ge=0)
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _parses(self) -> ScheduleConfig:
        from service.capacity import cron_trigger

        if self.duration < 60:
            raise ValueError("duration must be at least 1 minute")
        try:
            cron_trigger(self.cron, self.timezone)
        except (ValueError, KeyError) as exc:  # ZoneInfoNotFoundError is a KeyError
            raise ValueError(
                f"invalid cron {self.cron!r} or timezone {self.timezone!r}: {exc}"
            ) from None
        return self


class DistributionConfig(_Strict):
    """A duration's median and 95th percentile (seconds); the simulator draws a lognormal."""

    median: float = Field(gt=0)
    p95: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> DistributionConfig:
        if self.p95 < self.median:
            raise ValueError("p95 must not be below median")
        return self


class SimulationConfig(_Strict):
    """How ``workerlease simulate`` pretends this pool's provisioner behaves."""

    provision_seconds: DistributionConfig | None = None  # default by os
    failure_rate: float = Field(default=0.0, ge=0, lt=1)


class PoolConfig(_Strict):
    name: str = Field(pattern=POOL_NAME_RE)
    os: Literal["ubuntu", "windows", "linux"]
    description: str = ""
    provisioner: str = "local"
    min_ready: int = Field(default=2, ge=0)
    max_workers: int = Field(default=10, ge=0)
    lease_idle_timeout: Duration = 60 * 60
    lease_max_lifetime: Duration = 72 * 3600
    provision_timeout: Duration = 10 * 60
    pending_timeout: Duration = 30 * 60
    capabilities: list[str] = Field(default_factory=list)
    # Tasks one worker runs at once; more wait in order (queued).
    max_concurrent_tasks: int = Field(default=4, ge=1, le=64)
    options: dict[str, Any] = Field(default_factory=dict)
    # How many ready workers to keep (docs/capacity.md): fixed = min_ready; adaptive =
    # enough that a lease finds one with probability warm_hit_target. min_ready is the
    # floor either way, schedules raise it, max_workers caps it.
    warm_policy: Literal["fixed", "adaptive"] = "fixed"
    warm_hit_target: float = Field(default=0.95, gt=0, lt=1)
    scale_down_delay: Duration = 10 * 60
    # adaptive: the demand estimate's half-life (a second rate forgets five times faster).
    demand_half_life: Duration = Field(default=10 * 60, ge=5)
    schedules: list[ScheduleConfig] = Field(default_factory=list)
    cost_per_hour: float | None = Field(default=None, ge=0)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)

    @model_validator(mode="after")
    def _limits(self) -> PoolConfig:
        if self.min_ready > self.max_workers:
            raise ValueError("min_ready must not exceed max_workers")
        for schedule in self.schedules:
            if schedule.min_ready > self.max_workers:
                raise ValueError("a schedule's min_ready must not exceed max_workers")
        for key in ("lease_idle_timeout", "lease_max_lifetime", "provision_timeout"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1 second")
        return self


class Config(_Strict):
    database_url: str = "sqlite:///workerlease.db"
    admin_token: str | None = None
    # Fernet key(s), comma-separated (first encrypts); required on PostgreSQL.
    encryption_key: str | None = None
    public_url: str | None = None
    deployment_id: str = Field(default="default", pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    database_pool_size: int = Field(default=10, ge=1, le=200)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"  # text: logfmt lines; json: JSON lines
    # When set, GET /metrics needs "Authorization: Bearer <metrics_token>" (the scraper's).
    metrics_token: str | None = Field(default=None, min_length=16)
    # Lease requests with wait_seconds one tenant may have waiting at once, per web
    # process; beyond it they are refused with 429 (one tenant must not hold them all).
    max_waits_per_tenant: int = Field(default=16, ge=1, le=10_000)
    # Tasks and their logs stay readable this long after they end; then they are purged.
    task_retention: Duration = 7 * 86400
    # Bytes of output one task keeps; beyond it the rest is dropped (one marker line).
    task_log_limit: int = Field(default=16 << 20, ge=64 << 10, le=1 << 30)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    pools: list[PoolConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_pools(self) -> Config:
        names = [pool.name for pool in self.pools]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate pool names: {', '.join(duplicates)}")
        return self

    @field_validator("encryption_key")
    @classmethod
    def _valid_key(cls, value: str | None) -> str | None:
        if value:
            from service.crypto import validate_keys

            try:
                validate_keys(value)
            except ValueError:
                raise ValueError(
                    "must be Fernet keys (32 url-safe base64 bytes), comma-separated; "
                    "generate one with: workerlease gen-key"
                ) from None
        return value

    @model_validator(mode="after")
    def _key_required_off_sqlite(self) -> Config:
        if not self.database_url.startswith("sqlite") and not self.encryption_key:
            raise ValueError(
                "encryption_key: required with PostgreSQL (worker tokens are encrypted at "
                "rest); set WORKERLEASE_ENCRYPTION_KEY (workerlease gen-key makes one)"
            )
        return self

    def require_admin_token(self) -> str:
        if not self.admin_token:
            raise ConfigError(
                "admin_token: required; set it in the config or in WORKERLEASE_ADMIN_TOKEN"
            )
        if len(self.admin_token) < 16:
            raise ConfigError("admin_token: must be at least 16 characters")
        return self.admin_token


ENV_PREFIX = "WORKERLEASE_"
# Keys whose value is a list or a mapping: given as JSON in the environment.
_JSON_KEYS = ("pools", "scheduler")


def _env_keys() -> dict[str, tuple[str, ...]]:
    """Every key of the file as an environment variable, nested keys joined by ``__``
    (``WORKERLEASE_DEPLOYMENT_ID``, ``WORKERLEASE_SCHEDULER__INTERVAL``), as
    pydantic-settings names them."""
    keys: dict[str, tuple[str, ...]] = {
        f"{ENV_PREFIX}{name.upper()}": (name,) for name in Config.model_fields
    }
    for name in SchedulerConfig.model_fields:
        keys[f"{ENV_PREFIX}SCHEDULER__{name.upper()}"] = ("scheduler", name)
    return keys


ENV_OVERRIDES = _env_keys()


def load_config(
    path: str | os.PathLike[str] | None, environ: dict[str, str] | None = None
) -> Config:
    """Read, merge environment overrides (they win over the file), validate.

    The environment's values are validated like the file's and refused with the same
    messages, naming the key (``scheduler.interval: ...``). Pools' provisioner options
    are checked at process start (``service.passes.provisioning.check_pool_options``):
    that needs the registry.
    """
    environ = dict(os.environ) if environ is None else environ
    raw: dict[str, Any] = {}
    path = path if path is not None else environ.get("WORKERLEASE_CONFIG")
    if path:
        raw = _read_yaml(Path(path))
    for variable, key in ENV_OVERRIDES.items():
        if environ.get(variable):
            _set(raw, key, _env_value(variable, key, environ[variable]))
    return config_from_dict(raw)


def _env_value(variable: str, key: tuple[str, ...], text: str) -> Any:
    if key[0] not in _JSON_KEYS or len(key) > 1:
        return text  # pydantic converts "10", "true", "90s" as it does the file's values
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{variable}: {key[0]} is not valid JSON: {exc}") from None


def _set(raw: dict[str, Any], key: tuple[str, ...], value: Any) -> None:
    *parents, last = key
    for parent in parents:
        if not isinstance(raw.get(parent), dict):
            raw[parent] = {}
        raw = raw[parent]
    raw[last] = value


def config_from_dict(raw: dict[str, Any]) -> Config:
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping")
    return data


def describe(exc: ValidationError, prefix: str = "") -> str:
    """A validation error as one line per problem, each naming its key."""
    lines = []
    for error in exc.errors():
        location = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{location or '(top level)'}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
