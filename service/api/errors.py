"""The one place that turns any error into an RFC 9457 problem document."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException

from service.errors import DomainError

log = logging.getLogger("workerlease.api")

PROBLEM_TYPE = "application/problem+json"


def problem(
    status: int, title: str, detail: str, *, retry_after: int | None = None, **extra: Any
) -> Response:
    body = {"type": "about:blank", "status": status, "title": title, "detail": detail, **extra}
    response = jsonify(body)
    response.status_code = status
    response.mimetype = PROBLEM_TYPE
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="workerlease"'
    if status == 503 and retry_after is None:
        retry_after = 5
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def validation_problem(exc: ValidationError) -> Response:
    errors = [
        {"loc": [str(part) for part in error["loc"]], "msg": error["msg"], "type": error["type"]}
        for error in exc.errors(include_url=False, include_input=False)
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid"}
    where = ".".join(first["loc"]) or "body"
    return problem(422, "Invalid request", f"{where}: {first['msg']}", errors=errors)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(DomainError)
    def _domain(exc: DomainError) -> Response:
        return problem(exc.status, exc.title, exc.detail, retry_after=exc.retry_after, **exc.extra)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        if exc.response is not None:  # abort(response): already a finished answer
            return exc.response  # type: ignore[return-value]
        status = exc.code or 500
        response = problem(status, exc.name, exc.description or exc.name)
        if status == 405 and exc.get_response().headers.get("Allow"):
            response.headers["Allow"] = exc.get_response().headers["Allow"]
        return response

    @app.errorhandler(ValidationError)
    def _validation(exc: ValidationError) -> Response:
        return validation_problem(exc)

    @app.errorhandler(OperationalError)
    @app.errorhandler(PoolTimeoutError)
    def _database_down(exc: SQLAlchemyError) -> Response:
        log.warning("database_unavailable error=%s", type(exc).__name__)
        return problem(503, "Service unavailable", "the database is not reachable; retry later")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled_error")
        return problem(500, "Internal server error", "an unexpected error occurred")
