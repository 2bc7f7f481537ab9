"""Schemathesis against ``/openapi.json``: no generated request gets a 5xx or an off-schema answer.

The run drives the WSGI app directly, with the admin token on ``/v1/admin/*`` and
a tenant token elsewhere. It uses schemathesis' hypothesis strategies
(``APIOperation.as_strategy``) rather than ``schemathesis.pytest.from_fixture``,
whose lazy loader reads ``Node._nodeid``, a private attribute pytest 9 removed.

Two passes per operation: generated values in both generation modes (mostly
unknown ids and pools: 4xx answers), then positive cases pinned to rows that
exist (a live lease, its worker, a tenant, the pool), so the 2xx answers are
checked against their schemas too.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.conftest import ADMIN_TOKEN, Service, bearer

EXAMPLES_PER_OPERATION = 12
CHECKS = [not_a_server_error, response_schema_conformance]
POOL = "hosted-ubuntu"


def _fuzz(operation: Any, token: str, mode: GenerationMode, **fixed: Any) -> None:
    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(headers=bearer(token), checks=CHECKS)

    run()


def _pinned(operation: Any, known: dict[str, str]) -> dict[str, Any]:
    """Fixed path parameters (and the lease request body) naming rows that exist."""
    fixed: dict[str, Any] = {}
    names = {p.name for p in operation.path_parameters}
    if names:
        fixed["path_parameters"] = {name: known[name] for name in names}
    if operation.method.upper() == "POST" and operation.path == "/v1/leases":
        fixed["body"] = {"pool": POOL}
    return fixed


def test_generated_requests_never_get_a_server_error_or_off_schema_answer(
    app: Flask, svc: Service
) -> None:
    svc.warm()
    tenant_token = svc.tenant("fuzz")["token"]
    lease = svc.client.post(
        "/v1/leases", json={"pool": POOL}, headers=bearer(tenant_token)
    ).get_json()
    task = svc.client.post(
        f"/v1/leases/{lease['id']}/tasks", json={"script": "true"}, headers=bearer(tenant_token)
    ).get_json()
    worker_token = svc.worker_tokens[lease["worker"]["id"]]
    known = {
        "lease_id": lease["id"],
        "task_id": task["id"],
        "worker_id": lease["worker"]["id"],
        "tenant_id": svc.tenant("victim")["id"],
        "name": POOL,
    }
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    results = list(schema.get_all_operations())
    assert not [r for r in results if not isinstance(r, Ok)], "the document has bad operations"
    operations = [r.ok() for r in results if isinstance(r, Ok)]
    assert len(operations) >= 25

    failures = []
    for operation in operations:
        token = tenant_token
        if operation.path.startswith("/v1/admin"):
            token = ADMIN_TOKEN
        elif operation.path.startswith("/v1/workers/") and not operation.path.endswith("/ready"):
            token = worker_token
        runs = [
            (GenerationMode.POSITIVE, {}),
            (GenerationMode.NEGATIVE, {}),
            (GenerationMode.POSITIVE, _pinned(operation, known)),
        ]
        for mode, fixed in runs:
            try:
                _fuzz(operation, token, mode, **fixed)
            except Exception as exc:  # report every operation's failure at once
                failures.append(
                    f"{operation.method.upper()} {operation.path} {mode} {sorted(fixed)}: {exc}"
                )
    assert not failures, "\n\n".join(failures)
