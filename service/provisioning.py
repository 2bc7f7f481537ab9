"""The provisioner instances of a deployment, one per pool, built from the pools' settings.

This is the only place in ``service/`` that touches provisioners; it imports
the interface and the registry, never a cloud SDK (the registry loads each
implementation lazily).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass

from provisioners import Provisioner, provisioner_class
from service.models import Pool

log = logging.getLogger("workerlease.provisioning")


@dataclass(frozen=True)
class Deployment:
    deployment_id: str
    service_url: str


class ProvisionerSet:
    """Lazily built, cached provisioners; rebuilt when a pool's options change."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self._lock = threading.Lock()
        self._by_pool: dict[str, tuple[str, Provisioner]] = {}

    def for_pool(self, pool: Pool) -> Provisioner:
        key = f"{pool.provisioner}:{json.dumps(pool.options, sort_keys=True)}"
        with self._lock:
            cached = self._by_pool.get(pool.name)
            if cached is not None and cached[0] == key:
                return cached[1]
            cls = provisioner_class(pool.provisioner)
            instance = cls(pool.name, cls.Options.model_validate(pool.options))
            self._by_pool[pool.name] = (key, instance)
            if cached is not None:
                cached[1].close()
            return instance

    def distinct(self, pools: list[Pool]) -> list[Provisioner]:
        """One provisioner per provisioner kind and options, for deployment-wide listings."""
        seen: dict[str, Provisioner] = {}
        for pool in pools:
            key = f"{pool.provisioner}:{json.dumps(pool.options, sort_keys=True)}"
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
