"""Provisioners: the interface (``provisioners.base``) and the registry of implementations.

Built-in provisioners are imported lazily by name so that the core never imports
an optional SDK; third-party ones register under the entry-point group
``workerlease.provisioners`` (``name = "package.module:ClassName"``).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

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

ENTRY_POINT_GROUP = "workerlease.provisioners"

# name -> (module:Class, the pip extra that brings its SDK, or None)
BUILTIN: dict[str, tuple[str, str | None]] = {
    "local": ("provisioners.local:LocalProvisioner", None),
    "docker": ("provisioners.docker:DockerProvisioner", "docker"),
    "ec2": ("provisioners.ec2:EC2Provisioner", "aws"),
}


class UnknownProvisionerError(LookupError):
    pass


def provisioner_class(name: str) -> type[Provisioner[Any]]:
    """Find a provisioner class by name; a missing SDK names the extra to install.

    Which options model the class takes is known only at run time: validate a pool's
    options with its ``Options`` (``cls(pool, cls.Options.model_validate(options))``).
    """
    if name in BUILTIN:
        target, extra = BUILTIN[name]
        try:
            return _load(target)
        except ImportError as exc:
            hint = f" (pip install 'workerlease[{extra}]')" if extra else ""
            raise ImportError(f"provisioner {name!r} cannot be loaded: {exc}{hint}") from exc
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Provisioner)):
                raise TypeError(f"entry point {ep.value!r} is not a Provisioner subclass")
            return cls
    known = sorted({*BUILTIN, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})
    raise UnknownProvisionerError(f"unknown provisioner {name!r}; known: {', '.join(known)}")


def validate_options(name: str, options: dict[str, Any]) -> ProvisionerOptions:
    return provisioner_class(name).Options.model_validate(options)


def _load(target: str) -> type[Provisioner[Any]]:
    module_name, _, attr = target.partition(":")
    cls: type[Provisioner[Any]] = getattr(importlib.import_module(module_name), attr)
    return cls


__all__ = [
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "CapacityError",
    "PermanentProvisionerError",
    "Provisioner",
    "ProvisionerError",
    "ProvisionerOptions",
    "ResourceState",
    "TransientProvisionerError",
    "UnknownProvisionerError",
    "WorkerHandle",
    "WorkerSpec",
    "provisioner_class",
    "validate_options",
]
