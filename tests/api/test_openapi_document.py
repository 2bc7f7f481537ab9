"""``/openapi.json`` as client generators read it: stable camelCase operationIds, enums,
one Problem schema (with ``errors``) for every error, declared headers, pagination,
servers and examples. (tests/client/test_generated_client.py generates a client from
it and runs it against a real serve.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from service.models import EndReason, LeaseState, WorkerState
from tests.api.helpers import request_lease
from tests.conftest import Service, bearer


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'workerlease.db'}"  # the document is the same on both


@pytest.fixture
def document(client: FlaskClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    body: dict[str, Any] = response.get_json()
    return body


def operations(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        operation["operationId"]: operation
        for item in document["paths"].values()
        for operation in item.values()
    }


def test_operation_ids_are_unique_camel_case_names_of_what_they_do(
    document: dict[str, Any],
) -> None:
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z]+(?:[A-Z][a-z]+)*", op_id) for op_id in ids), ids
    expected = {
        "createLease",
        "listLeases",
        "getLease",
        "renewLease",
        "releaseLease",
        "listPools",
        "submitTask",
        "getTaskLog",
        "cancelTask",
        "adminListLeases",
        "adminListEvents",
        "adminCreateTenant",
        "workerReady",
        "workerPoll",
    }
    assert expected <= set(ids)


def test_states_reasons_and_kinds_are_enums(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    lease = schemas["LeaseOut"]["properties"]
    assert lease["state"] == {"$ref": "#/components/schemas/LeaseState"}
    assert schemas["LeaseState"]["enum"] == [s.value for s in LeaseState]
    assert {"$ref": "#/components/schemas/EndReason"} in lease["end_reason"]["anyOf"]
    assert schemas["EndReason"]["enum"] == [r.value for r in EndReason]
    worker_state = schemas["AdminWorkerOut"]["properties"]["state"]
    assert worker_state == {"$ref": "#/components/schemas/WorkerState"}
    assert schemas["WorkerState"]["enum"] == [s.value for s in WorkerState]
    assert set(schemas["EventOut"]["properties"]["kind"]["enum"]) == {
        "worker",
        "lease",
        "tenant",
        "pool",
        "task",
    }


def test_every_error_is_the_problem_document_with_its_errors(document: dict[str, Any]) -> None:
    assert "ValidationErrorModel" not in json.dumps(document)
    problem = document["components"]["schemas"]["Problem"]
    assert {"type", "status", "title", "detail", "errors"} <= set(problem["properties"])
    for op_id, operation in operations(document).items():
        for status, answer in operation["responses"].items():
            if int(status) < 400:
                continue
            schema = answer["content"]["application/problem+json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Problem"}, (op_id, status)
        assert "422" in operation["responses"], op_id


def test_location_and_retry_after_are_declared(document: dict[str, Any]) -> None:
    ops = operations(document)
    create = ops["createLease"]["responses"]
    assert {"Location", "Retry-After"} <= set(create["202"]["headers"])
    assert "Location" in create["201"]["headers"] and "Location" in create["200"]["headers"]
    assert "Location" in ops["submitTask"]["responses"]["201"]["headers"]
    for op_id, operation in ops.items():
        for status in ("429", "503"):
            if status in operation["responses"]:
                assert "Retry-After" in operation["responses"][status]["headers"], op_id


def test_lists_page_and_the_main_operations_have_examples(document: dict[str, Any]) -> None:
    ops = operations(document)
    for op_id in ("listLeases", "adminListLeases", "adminListWorkers", "adminListTenants"):
        names = {p["name"] for p in ops[op_id].get("parameters", [])}
        assert {"limit", "offset"} <= names, op_id
    assert document["servers"]
    create = ops["createLease"]
    assert create["requestBody"]["content"]["application/json"]["example"]["pool"]
    assert create["responses"]["201"]["content"]["application/json"]["example"]["state"]
    assert ops["submitTask"]["requestBody"]["content"]["application/json"]["example"]["script"]


def test_a_tenants_lease_list_pages_with_next_offset(svc: Service) -> None:
    svc.warm()
    token = svc.tenant()["token"]
    first = request_lease(svc.client, token).get_json()
    svc.client.delete(f"/v1/leases/{first['id']}", headers=bearer(token))
    svc.clock.advance(seconds=1)
    second = request_lease(svc.client, token).get_json()

    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        page = svc.client.get(
            f"/v1/leases?state=all&limit=1&offset={offset}", headers=bearer(token)
        ).get_json()
        seen += [lease["id"] for lease in page["leases"]]
        offset = page["next_offset"]
    assert seen == [second["id"], first["id"]]  # newest first, each once
    refused = svc.client.get("/v1/leases?limit=0", headers=bearer(token))
    assert refused.status_code == 422
    assert refused.get_json()["errors"][0]["loc"] == ["limit"]
