"""The OpenAPI document as client generators need it.

flask-openapi3 builds the document from the views and the schemas. What it cannot
know from them is added here, once, when the document is first generated:

- operationIds from the view functions (``createLease``, ``adminListEvents``), stable
  across path changes, instead of ``leases_create_lease_post``;
- every 422 is the problem document the service sends (flask-openapi3 declares an
  array of its own ``ValidationErrorModel`` where a view did not list 422);
- the headers the service sets: ``Location`` on creations, ``Retry-After`` on 202
  (a pending lease), 429 and 503;
- ``servers`` and examples of the main operations.

A view added later gets its operationId by the same rule; two views with one id fail
the generation (a bug, raised).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from flask import Flask
from flask_openapi3 import OpenAPI

# Blueprints whose views are named after what they do on someone else's resources:
# their operationIds carry the audience (adminListLeases beside the tenant's listLeases).
PREFIXES = {"admin": "admin", "workers": "worker", "worker_tasks": "worker"}
# Where the view's own name reads badly as an operation.
RENAMED = {"taskLog": "getTaskLog"}

PROBLEM = {"$ref": "#/components/schemas/Problem"}
RETRY_AFTER = {
    "description": "Seconds to wait before trying again",
    "schema": {"type": "integer", "minimum": 0},
}
LOCATION = {"description": "The URL of the resource", "schema": {"type": "string"}}
# (operationId, status) -> headers the view sets on that answer.
HEADERS: dict[tuple[str, str], dict[str, Any]] = {
    ("createLease", "200"): {"Location": LOCATION},
    ("createLease", "201"): {"Location": LOCATION},
    ("createLease", "202"): {"Location": LOCATION, "Retry-After": RETRY_AFTER},
    ("submitTask", "201"): {"Location": LOCATION},
}

_LEASE_EXAMPLE = {
    "id": "l-0a1b2c3d4e5f60718293",
    "tenant_id": "t-00112233445566778899",
    "pool": "hosted-ubuntu",
    "state": "active",
    "created_at": "2026-01-01T12:00:00Z",
    "activated_at": "2026-01-01T12:00:00Z",
    "idle_expires_at": "2026-01-01T13:00:00Z",
    "expires_at": "2026-01-04T12:00:00Z",
    "ended_at": None,
    "end_reason": None,
    "worker": {
        "id": "w-a1b2c3d4e5f6a7b8c9d0",
        "pool": "hosted-ubuntu",
        "os": "ubuntu",
        "address": "10.0.1.17",
        "agent_url": "http://10.0.1.17:8081",
        "access_token": "wla_…",
    },
}
_TASK_EXAMPLE = {
    "id": "t-0f1e2d3c4b5a69788796",
    "lease_id": "l-0a1b2c3d4e5f60718293",
    "state": "queued",
    "exit_code": None,
    "error": None,
    "created_at": "2026-01-01T12:00:05Z",
    "started_at": None,
    "finished_at": None,
    "shell": "sh",
    "timeout_s": 600,
    "container": None,
    "log_bytes": 0,
}
# operationId -> ("request" or a status, example)
EXAMPLES: dict[str, list[tuple[str, Any]]] = {
    "createLease": [
        ("request", {"pool": "hosted-ubuntu", "wait_seconds": 30}),
        ("201", _LEASE_EXAMPLE),
    ],
    "getLease": [("200", _LEASE_EXAMPLE)],
    "listPools": [
        (
            "200",
            {
                "pools": [
                    {
                        "name": "hosted-ubuntu",
                        "os": "ubuntu",
                        "description": "Ubuntu 24.04, 4 vCPU",
                        "capabilities": ["docker"],
                        "lease_idle_timeout_s": 3600,
                        "lease_max_lifetime_s": 259200,
                    }
                ]
            },
        )
    ],
    "submitTask": [
        (
            "request",
            {
                "script": "kubectl apply -f deploy.yaml",
                "timeout_s": 600,
                "env": {"STAGE": "test"},
                "files": {"deploy.yaml": "a2luZDogRGVwbG95bWVudAo="},
            },
        ),
        ("201", _TASK_EXAMPLE),
    ],
}


def install(app: OpenAPI, public_url: str | None) -> None:
    """Polish the document each time flask-openapi3 generates it (once: it caches it)."""
    generate = app.generate_spec_json

    def generate_polished() -> None:
        generate()
        polish(app.spec_json, operation_ids(app), public_url)

    app.generate_spec_json = generate_polished  # type: ignore[method-assign]


def operation_ids(app: Flask) -> dict[tuple[str, str], str]:
    """(OpenAPI path, method) -> camelCase operationId from the view's name."""
    ids: dict[tuple[str, str], str] = {}
    for rule in app.url_map.iter_rules():
        blueprint, _, view = rule.endpoint.rpartition(".")
        prefix = PREFIXES.get(blueprint)
        name = camel(f"{prefix}_{view}" if prefix else view)
        name = RENAMED.get(name, name)
        path = re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            ids[(path, method.lower())] = name
    return ids


def camel(snake: str) -> str:
    first, *rest = snake.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


def polish(
    spec: dict[str, Any], ids: Mapping[tuple[str, str], str], public_url: str | None
) -> None:
    seen: dict[str, str] = {}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            operation_id = ids[(path, method)]
            if operation_id in seen:
                raise ValueError(f"operationId {operation_id} twice: {seen[operation_id]}, {path}")
            seen[operation_id] = path
            operation["operationId"] = operation_id
            _responses(operation, operation_id)
            _examples(operation, operation_id)
    spec["components"]["schemas"].pop("ValidationErrorModel", None)
    spec["servers"] = [{"url": public_url or "/", "description": "this service"}]


def _responses(operation: dict[str, Any], operation_id: str) -> None:
    responses = {str(status): answer for status, answer in operation["responses"].items()}
    responses["422"] = {
        "description": "Unprocessable Entity: the request is not valid (`errors` says where)",
        "content": {"application/problem+json": {"schema": PROBLEM}},
    }
    for status, answer in responses.items():
        headers = dict(HEADERS.get((operation_id, status), {}))
        if status in ("429", "503"):
            headers["Retry-After"] = RETRY_AFTER
        if headers:
            answer.setdefault("headers", {}).update(copy.deepcopy(headers))
    operation["responses"] = responses


def _examples(operation: dict[str, Any], operation_id: str) -> None:
    for where, example in EXAMPLES.get(operation_id, []):
        if where == "request":
            content = operation["requestBody"]["content"]
        else:
            content = operation["responses"][where]["content"]
        for media in content.values():
            media["example"] = copy.deepcopy(example)
