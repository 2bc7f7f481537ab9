"""The border with the provisioner package: instances per pool, handles and failures.

The passes ask this module for a pool's provisioner, and translate between the
service's rows and the provisioner's types here: a worker row becomes a
:class:`WorkerHandle`, a raised error becomes the domain's :class:`CallFailure`.
It imports the interface and the registry, never a cloud SDK (the registry loads
each implementation lazily).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from provisioners import (
    PermanentProvisionerError,
    Provisioner,
    ProvisionerError,
    UnknownProvisionerError,
    WorkerHandle,
    provisioner_class,
    validate_options,
)
from service.config import Config, ConfigError, describe
from service.pools import PoolView
from service.workers import CallFailure

log = logging.getLogger("workerlease.provisioning")


@dataclass(frozen=True)
class Deployment:
    deployment_id: str
    service_url: str
    installation_id: str = ""  # this database's id (service.pools.installation_id)


class ProvisionerSet:
    """Lazily built, cached provisioners; rebuilt when a pool's options change."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self._lock = threading.Lock()
        self._by_pool: dict[str, tuple[str, Provisioner[Any]]] = {}

    def for_pool(self, pool: PoolView) -> Provisioner[Any]:
        key = f"{_settings_key(pool)}:{sorted(pool.capabilities)}"
        with self._lock:
            cached = self._by_pool.get(pool.name)
            if cached is not None and cached[0] == key:
                return cached[1]
            cls = provisioner_class(pool.provisioner)
            instance = cls(pool.name, cls.Options.model_validate(pool.options))
            instance.capabilities = frozenset(pool.capabilities)
            self._by_pool[pool.name] = (key, instance)
            if cached is not None:
                cached[1].close()
            return instance

    def distinct(self, pools: Sequence[PoolView]) -> list[Provisioner[Any]]:
        """One provisioner per provisioner kind and options, for deployment-wide listings."""
        seen: dict[str, Provisioner[Any]] = {}
        for pool in pools:
            key = _settings_key(pool)
            if key not in seen:
                seen[key] = self.for_pool(pool)
        return list(seen.values())

    def close(self) -> None:
        with self._lock:
            for _, instance in self._by_pool.values():
                try:
                    instance.close()
                except Exception:  # closing is best effort at shutdown
                    log.exception("provisioner_close_failed")
            self._by_pool.clear()


def check_pool_options(config: Config) -> None:
    """Every pool's provisioner exists and accepts its options; the error names the key.

    Run at process start (the CLI), so a typo fails before anything is served.
    """
    for index, pool in enumerate(config.pools):
        where = f"pools.{index}"
        try:
            validate_options(pool.provisioner, pool.options)
        except (UnknownProvisionerError, ImportError) as exc:
            raise ConfigError(f"{where}.provisioner: {exc}") from None
        except ValidationError as exc:
            raise ConfigError(describe(exc, prefix=f"{where}.options")) from None


def _settings_key(pool: PoolView) -> str:
    """Pools with equal keys can share one provisioner instance."""
    return f"{pool.provisioner}:{json.dumps(pool.options, sort_keys=True)}"


def failure_of(exc: Exception) -> CallFailure:
    """A raised error as the domain records it; anything not a provisioner error is a bug."""
    kind = type(exc).__name__ if isinstance(exc, ProvisionerError) else "unexpected"
    return CallFailure(
        kind=kind, detail=str(exc), permanent=isinstance(exc, PermanentProvisionerError)
    )


class WorkerLocation(Protocol):
    """What finds a worker's resource: a ``Worker`` row, or just those columns."""

    @property
    def id(self) -> str: ...
    @property
    def pool(self) -> str: ...
    @property
    def provider_id(self) -> str | None: ...
    @property
    def address(self) -> str | None: ...


Located = TypeVar("Located", bound=WorkerLocation)


def handle_of(worker: WorkerLocation) -> WorkerHandle:
    # provider_id may be empty when create never returned: provisioners then find the
    # resource by its worker-id label.
    return WorkerHandle(
        worker_id=worker.id,
        pool=worker.pool,
        provider_id=worker.provider_id or "",
        address=worker.address,
    )


def group_by_pool(workers: Iterable[Located]) -> dict[str, list[Located]]:
    grouped: dict[str, list[Located]] = defaultdict(list)
    for worker in workers:
        grouped[worker.pool].append(worker)
    return grouped
