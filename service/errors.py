"""Domain errors: what the domain raises and the HTTP layer answers with its status
(``service.api.errors`` turns any error into an RFC 9457 problem document). No
web framework here: the domain, and ``workerlease simulate`` with it, import this."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    status = 400
    title = "Bad request"

    def __init__(self, detail: str, *, retry_after: int | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        self.extra = extra


class NotFound(DomainError):
    status = 404
    title = "Not found"


class Conflict(DomainError):
    status = 409
    title = "Conflict"


class Unauthorized(DomainError):
    status = 401
    title = "Unauthorized"


class Forbidden(DomainError):
    status = 403
    title = "Forbidden"


class InvalidRequest(DomainError):
    status = 422
    title = "Invalid request"


class RangeNotSatisfiable(DomainError):
    status = 416
    title = "Range not satisfiable"


class TooManyRequests(DomainError):
    status = 429
    title = "Too many requests"
