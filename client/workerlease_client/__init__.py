"""The tenant's client for workerlease: lease a worker, run steps on it, release it.

::

    from workerlease_client import Client

    with Client() as wl, wl.lease("hosted-ubuntu", wait=600) as lease:
        result = lease.run("echo hello; uname -sr")
        print(result.exit_code, result.log)
"""

from __future__ import annotations

__version__ = "0.1.0"

from workerlease_client._http import Retry
from workerlease_client.client import Client
from workerlease_client.errors import (
    Conflict,
    ConnectionFailed,
    Forbidden,
    LeaseEnded,
    LeaseTimeout,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    ValidationError,
    WaitTimeout,
    WorkerleaseError,
)
from workerlease_client.lease import Lease, Task
from workerlease_client.models import LeaseInfo, LogChunk, Pool, Result, TaskInfo, Worker

__all__ = [
    "Client",
    "Conflict",
    "ConnectionFailed",
    "Forbidden",
    "Lease",
    "LeaseEnded",
    "LeaseInfo",
    "LeaseTimeout",
    "LogChunk",
    "NotFound",
    "PayloadTooLarge",
    "Pool",
    "RateLimited",
    "Result",
    "Retry",
    "ServerError",
    "ServiceUnavailable",
    "Task",
    "TaskInfo",
    "Unauthorized",
    "ValidationError",
    "WaitTimeout",
    "Worker",
    "WorkerleaseError",
    "__version__",
]
