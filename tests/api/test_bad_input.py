"""Malformed requests get a 4xx problem document (RFC 9457), never a 500 or a traceback.

Each test walks a table of bad requests against one service (a fresh database per
case would cost more than the cases themselves).
"""

from __future__ import annotations

from typing import Any

import pytest
from werkzeug.test import TestResponse

from tests.api.helpers import POOL
from tests.conftest import Service, admin, bearer

JSON = {"Content-Type": "application/json"}


def _assert_problem(
    response: TestResponse, status: int | None = None, case: Any = None
) -> dict[str, Any]:
    """A problem document with ``status`` (any 4xx when None)."""
    text = response.get_data(as_text=True)
    if status is None:
        assert 400 <= response.status_code < 500, (case, response.status_code, text)
    else:
        assert response.status_code == status, (case, text)
    assert response.content_type == "application/problem+json", case
    body: dict[str, Any] = response.get_json()
    assert body["status"] == response.status_code, case
    assert isinstance(body["title"], str) and body["title"], case
    assert isinstance(body["detail"], str) and body["detail"], case
    assert "Traceback" not in text, case
    return body


@pytest.fixture
def token(svc: Service) -> str:
    return svc.tenant()["token"]


def test_lease_body_that_is_not_a_json_object_is_refused(svc: Service, token: str) -> None:
    for data, headers in [
        ("not json", {}),
        ("not json", JSON),
        ('{"pool": "hosted-ubuntu"', JSON),
        (b"\xff\xfe\x00", JSON),
        ("[1, 2]", JSON),
        ('"hosted-ubuntu"', JSON),
        ("null", JSON),
        ("", JSON),
        ('{"pool": "hosted-ubuntu"}', {"Content-Type": "text/plain"}),
    ]:
        response = svc.client.post("/v1/leases", data=data, headers={**bearer(token), **headers})
        _assert_problem(response, case=data)
    assert svc.client.get("/v1/admin/leases", headers=admin()).get_json()["leases"] == []


def test_lease_body_with_wrong_types_or_unknown_fields_is_422_naming_the_field(
    svc: Service, token: str
) -> None:
    for body, where in [
        ({"pool": 5}, "pool"),
        ({"pool": None}, "pool"),
        ({"pool": "Not A Pool!"}, "pool"),
        ({"pool": POOL, "wait_seconds": "soon"}, "wait_seconds"),
        ({"pool": POOL, "wait_seconds": 61}, "wait_seconds"),
        ({"pool": POOL, "wait_seconds": -1}, "wait_seconds"),
        ({"pool": POOL, "wait_seconds": 1.5}, "wait_seconds"),
        ({"pool": POOL, "wait_seconds": True}, "wait_seconds"),
        ({"pool": POOL, "wait_seconds": "5"}, "wait_seconds"),
        ({"pool": POOL, "priority": "high"}, "priority"),
        ({}, "pool"),
    ]:
        response = svc.client.post("/v1/leases", json=body, headers=bearer(token))
        assert _assert_problem(response, 422, body)["detail"].startswith(where), body
    assert svc.client.get("/v1/admin/leases", headers=admin()).get_json()["leases"] == []


def test_oversize_body_is_413(svc: Service, token: str) -> None:
    big = '{"pool": "' + "a" * (64 * 1024) + '"}'
    _assert_problem(svc.client.post("/v1/leases", data=big, headers={**bearer(token), **JSON}), 413)
    _assert_problem(
        svc.client.post("/v1/admin/tenants", data=big, headers={**admin(), **JSON}), 413
    )
    tenants = svc.client.get("/v1/admin/tenants", headers=admin()).get_json()["tenants"]
    assert len(tenants) == 1


def test_bad_ids_in_paths_are_refused(svc: Service, token: str) -> None:
    for path in [
        "/v1/leases/not-an-id",
        "/v1/leases/l-XYZ",
        "/v1/leases/l-" + "0" * 200,
        "/v1/leases/%00",
        "/v1/leases/l-0123456789abcdef012%27",
    ]:
        for method in ("GET", "DELETE", "POST"):
            target = f"{path}/renew" if method == "POST" else path
            _assert_problem(
                svc.client.open(target, method=method, headers=bearer(token)), case=(method, target)
            )
    for path in [
        "/v1/admin/tenants/robert'); DROP TABLE tenants;--",
        "/v1/admin/workers/w-1",
        "/v1/admin/leases/..%2f..",
        "/v1/admin/pools/UPPER",
    ]:
        method = "PATCH" if "/pools/" in path else "DELETE"
        _assert_problem(
            svc.client.open(path, method=method, json={"min_ready": 1}, headers=admin()), case=path
        )
    _assert_problem(
        svc.client.post(
            "/v1/workers/not-a-worker/ready",
            json={"agent_url": "http://127.0.0.1:1/"},
            headers=bearer("wlb_x"),
        )
    )


def test_well_formed_but_unknown_ids_are_404(svc: Service, token: str) -> None:
    unknown = "l-0123456789abcdef0123"
    _assert_problem(svc.client.get(f"/v1/leases/{unknown}", headers=bearer(token)), 404)
    _assert_problem(svc.client.delete(f"/v1/admin/leases/{unknown}", headers=admin()), 404)
    _assert_problem(
        svc.client.delete("/v1/admin/tenants/t-0123456789abcdef0123", headers=admin()), 404
    )
    _assert_problem(
        svc.client.delete("/v1/admin/workers/w-0123456789abcdef0123", headers=admin()), 404
    )
    _assert_problem(
        svc.client.post("/v1/leases", json={"pool": "no-such-pool"}, headers=bearer(token)), 404
    )


def test_bad_query_values_are_422(svc: Service, token: str) -> None:
    for query in [
        "/v1/leases?state=bogus",
        "/v1/leases?colour=red",
        "/v1/admin/leases?limit=abc",
        "/v1/admin/leases?limit=0",
        "/v1/admin/leases?limit=100000",
        "/v1/admin/leases?offset=-1",
        "/v1/admin/leases?tenant=nope",
        "/v1/admin/leases?pool=A_B",
        "/v1/admin/workers?state=sleeping",
        "/v1/admin/events?limit=-5",
        "/v1/admin/events?before=0",
        "/v1/admin/events?before=99999999999999999999999",
        "/v1/admin/tenants?offset=x",
    ]:
        headers = admin() if query.startswith("/v1/admin") else bearer(token)
        _assert_problem(svc.client.get(query, headers=headers), 422, query)


def test_bad_pool_patch_and_tenant_bodies_are_422(svc: Service) -> None:
    body: Any
    for body in (
        {"min_ready": "two"},
        {"enabled": "maybe"},
        {"max_workers": 1.5},
        {"name": "renamed"},
        [],
    ):
        _assert_problem(
            svc.client.patch(f"/v1/admin/pools/{POOL}", json=body, headers=admin()), 422, body
        )
    for name in ("", "x" * 201, "nul\u0000byte", "line\nbreak", 42):
        _assert_problem(
            svc.client.post("/v1/admin/tenants", json={"name": name}, headers=admin()), 422, name
        )
    assert svc.client.get("/v1/admin/tenants", headers=admin()).get_json()["tenants"] == []


def test_wrong_method_is_405_problem_with_allow(svc: Service, token: str) -> None:
    for method, path in [
        ("PUT", "/v1/leases"),
        ("PATCH", "/v1/leases"),
        ("POST", "/v1/pools"),
        ("GET", "/v1/leases/l-0123456789abcdef0123/renew"),
        ("PUT", "/v1/admin/pools/x"),
        ("GET", "/v1/workers/w-0123456789abcdef0123/ready"),
    ]:
        response = svc.client.open(path, method=method, headers=bearer(token))
        _assert_problem(response, 405, (method, path))
        assert response.headers["Allow"], (method, path)


def test_unknown_path_is_404_problem(svc: Service) -> None:
    _assert_problem(svc.client.get("/v1/nothing-here"), 404)


def test_deeply_nested_json_is_a_4xx_problem_never_a_500(svc: Service, token: str) -> None:
    for body in ['{"a":' * 1000, '{"a":' * 1000 + "1" + "}" * 1000, "[" * 20000 + "]" * 20000]:
        response = svc.client.post("/v1/leases", data=body, headers={**bearer(token), **JSON})
        _assert_problem(response, case=body[:10])
    tenant = svc.client.post("/v1/admin/tenants", data="[" * 20000, headers={**admin(), **JSON})
    _assert_problem(tenant)


def test_tenant_names_that_would_display_as_something_else_are_refused(svc: Service) -> None:
    for name in ["\u202eevil\u2028x", "a\u200bb", "line\u2029break", "bell\u0007", "rtl\u2067x"]:
        response = svc.client.post("/v1/admin/tenants", json={"name": name}, headers=admin())
        assert _assert_problem(response, 422, name)["detail"].startswith("name"), name
    accepted = svc.client.post(
        "/v1/admin/tenants", json={"name": "Ünïcode Ltd — 東京"}, headers=admin()
    )
    assert accepted.status_code == 201
