"""HTTP API blueprints: one per resource, views of a few lines."""

from __future__ import annotations

from typing import Any, TypeVar

from flask import current_app
from flask_openapi3 import Tag
from sqlalchemy import bindparam
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import BindParameter
from sqlmodel import col

from service.app import Services
from service.schemas import Problem

S = TypeVar("S", bound=Select[Any])

BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
PROBLEMS: dict[Any, Any] = {401: Problem, 403: Problem, 404: Problem, 422: Problem, 503: Problem}

TENANT_TAG = Tag(name="tenant", description="What a customer instance calls")
ADMIN_TAG = Tag(name="admin", description="Operators (admin token)")
AGENT_TAG = Tag(name="agent", description="Worker agent callbacks")


def svc() -> Services:
    result: Services = current_app.extensions["workerlease"]
    return result


def by_state(statement: S, column: Any, state: str, live: tuple[str, ...]) -> S:
    """Apply a ``?state=`` filter: a state, ``live`` (the given live states) or ``all``."""
    if state == "live":
        # Literal values, so the partial "live" indexes (service.models) match them.
        states: BindParameter[list[str]] = bindparam(
            "live_states", [str(s) for s in live], expanding=True, literal_execute=True
        )
        return statement.where(col(column).in_(states))
    if state != "all":
        return statement.where(column == state)
    return statement


def problems(*codes: int) -> dict[Any, Any]:
    return {code: Problem for code in codes}
