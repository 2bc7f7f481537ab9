"""botocore exceptions translated into the provisioner's error classes, at the border."""

from __future__ import annotations

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
)

from provisioners.base import (
    CapacityError,
    PermanentProvisionerError,
    ProvisionerError,
    TransientProvisionerError,
)

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


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def translate_error(exc: Exception, action: str) -> ProvisionerError:
    """Map a botocore exception to the provisioner's error classes."""
    if isinstance(exc, ProvisionerError):
        return exc
    if isinstance(exc, ClientError):
        code = error_code(exc)
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
