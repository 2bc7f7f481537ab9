"""Typed errors. Each carries the service's problem document (RFC 9457): status, title,
detail, and the whole document as ``problem`` (extension members such as ``errors``)."""

from __future__ import annotations

from typing import Any


class WorkerleaseError(Exception):
    """Base of every error the client raises."""

    status: int | None = None
    title: str = "Error"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        title: str | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        if title is not None:
            self.title = title
        self.problem: dict[str, Any] = problem or {}

    def __str__(self) -> str:
        return f"{self.title}: {self.detail}"


class ConnectionFailed(WorkerleaseError):
    """The service could not be reached, or the connection broke before an answer."""

    title = "Connection failed"


class Unauthorized(WorkerleaseError):
    status = 401
    title = "Unauthorized"


class Forbidden(WorkerleaseError):
    status = 403
    title = "Forbidden"


class NotFound(WorkerleaseError):
    status = 404
    title = "Not found"


class Conflict(WorkerleaseError):
    status = 409
    title = "Conflict"


class PayloadTooLarge(WorkerleaseError):
    status = 413
    title = "Payload too large"


class ValidationError(WorkerleaseError):
    """422: the request was refused; ``errors`` lists each problem (loc, msg, type)."""

    status = 422
    title = "Invalid request"

    @property
    def errors(self) -> list[dict[str, Any]]:
        errors = self.problem.get("errors")
        return errors if isinstance(errors, list) else []


class RateLimited(WorkerleaseError):
    """429 after the client's retries ran out."""

    status = 429
    title = "Too many requests"


class ServerError(WorkerleaseError):
    """A 5xx answer (500, or 503 after the client's retries ran out)."""

    status = 500
    title = "Internal server error"


class ServiceUnavailable(ServerError):
    status = 503
    title = "Service unavailable"


class WaitTimeout(WorkerleaseError):
    """The client stopped waiting at the deadline it was given."""

    title = "Timed out"


class LeaseTimeout(WaitTimeout):
    """No worker within the wait; the pending lease has been released."""

    title = "No worker in time"


class LeaseEnded(WorkerleaseError):
    """The lease is no longer active (failed, expired, revoked or released)."""

    title = "Lease ended"


BY_STATUS: dict[int, type[WorkerleaseError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationError,
    429: RateLimited,
    503: ServiceUnavailable,
}


def from_problem(status: int, problem: dict[str, Any], fallback_detail: str) -> WorkerleaseError:
    """The typed error for an answer with this status and (possibly empty) problem document."""
    cls = BY_STATUS.get(status) or (ServerError if status >= 500 else WorkerleaseError)
    title = problem.get("title")
    detail = problem.get("detail")
    return cls(
        detail if isinstance(detail, str) and detail else fallback_detail,
        status=status,
        title=title if isinstance(title, str) and title else None,
        problem=problem,
    )
