"""HTTP requests are counted by route template, method and status; never by raw path."""

from __future__ import annotations

from prometheus_client import REGISTRY

from tests.conftest import Service, bearer


def _count(route: str, method: str, status: str) -> float:
    labels = {"route": route, "method": method, "status": status}
    return REGISTRY.get_sample_value("workerlease_http_requests_total", labels) or 0.0


def test_requests_count_under_their_route_template(svc: Service) -> None:
    lease_route = "/v1/leases/<lease_id>"
    before = (
        _count(lease_route, "GET", "404"),
        _count("<unmatched>", "GET", "404"),
        _count("<unmatched>", "other", "405"),
    )
    token = svc.tenant()["token"]
    missing_lease = svc.client.get("/v1/leases/l-00000000000000000001", headers=bearer(token))
    assert missing_lease.status_code == 404
    assert svc.client.get("/no/such/l-00000000000000000001").status_code == 404
    assert svc.client.open("/v1/leases", method="BREW").status_code == 405
    after = (
        _count(lease_route, "GET", "404"),
        _count("<unmatched>", "GET", "404"),
        _count("<unmatched>", "other", "405"),
    )
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]
    routes = {
        sample.labels["route"]
        for family in REGISTRY.collect()
        if family.name == "workerlease_http_requests"
        for sample in family.samples
    }
    assert not [route for route in routes if "l-0000" in route], routes
