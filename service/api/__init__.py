"""HTTP API blueprints: one per resource, views of a few lines."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import current_app
from flask_openapi3 import Tag

from service.schemas import Problem

if TYPE_CHECKING:  # the app imports the blueprints; at run time this is a lookup
    from service.app import Services

BEARER: list[dict[str, list[str]]] = [{"bearer": []}]

TENANT_TAG = Tag(name="tenant", description="What a customer instance calls")
ADMIN_TAG = Tag(name="admin", description="Operators (admin token)")
AGENT_TAG = Tag(name="agent", description="Worker agent callbacks")


def svc() -> Services:
    result: Services = current_app.extensions["workerlease"]
    return result


def problems(*codes: int) -> dict[Any, Any]:
    return {code: Problem for code in codes}
