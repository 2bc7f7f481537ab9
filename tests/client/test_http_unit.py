"""The client's HTTP layer against ``httpx.MockTransport``: what is retried and how long
it waits (the client's ``sleep`` is recorded, never slept), and problem documents as
typed errors."""

from __future__ import annotations

import httpx
import pytest
from workerlease_client import (
    Client,
    Conflict,
    ConnectionFailed,
    NotFound,
    RateLimited,
    Retry,
    ServerError,
    ServiceUnavailable,
    ValidationError,
    WorkerleaseError,
)
from workerlease_client._http import retry_after_seconds

from tests.client.mocks import URL, Recorder, lease_json, problem, sequence, task_json


def test_429_and_503_are_retried_after_the_retry_after_the_service_asked_for() -> None:
    rec = Recorder(
        sequence(
            problem(429, "Too many requests", "slow down", headers={"Retry-After": "3"}),
            problem(503, "Service unavailable", "db", headers={"Retry-After": "7"}),
            httpx.Response(200, json={"pools": []}),
        )
    )
    assert rec.client().pools() == []
    assert rec.sleeps == [3.0, 7.0]
    assert rec.calls("GET", "/v1/pools") == 3


def test_a_task_post_refused_with_503_is_sent_again_but_never_after_a_broken_connection() -> None:
    rec = Recorder(
        sequence(
            problem(503, "Service unavailable", "db", headers={"Retry-After": "1"}),
            httpx.Response(201, json=task_json()),
        )
    )
    task = rec.client().submit_task("l-0000000000000000000a", "echo hi")
    assert task.state == "queued"
    assert rec.calls("POST", "/tasks") == 2 and rec.sleeps == [1.0]

    # The request went out and the connection broke: it may have been carried out.
    rec = Recorder(sequence(httpx.ReadError("connection reset"), httpx.Response(201)))
    with pytest.raises(ConnectionFailed, match="not repeated"):
        rec.client().submit_task("l-0000000000000000000a", "echo hi")
    assert rec.calls("POST", "/tasks") == 1 and rec.sleeps == []

    rec = Recorder(sequence(httpx.ReadTimeout("slow"), httpx.Response(201)))
    with pytest.raises(ConnectionFailed):
        rec.client().submit_task("l-0000000000000000000a", "echo hi")
    assert rec.calls("POST", "/tasks") == 1


def test_a_task_post_that_never_connected_is_tried_again() -> None:
    rec = Recorder(sequence(httpx.ConnectError("refused"), httpx.Response(201, json=task_json())))
    rec.client().submit_task("l-0000000000000000000a", "echo hi")
    assert rec.calls("POST", "/tasks") == 2
    assert len(rec.sleeps) == 1 and 0 <= rec.sleeps[0] <= Retry().base


def test_the_lease_post_is_idempotent_so_a_broken_connection_is_retried() -> None:
    rec = Recorder(
        sequence(
            httpx.RemoteProtocolError("Server disconnected without sending a response."),
            httpx.Response(200, json=lease_json()),
        )
    )
    lease = rec.client().request_lease("hosted-ubuntu")
    assert lease.existing and lease.state == "active"
    assert rec.calls("POST", "/v1/leases") == 2


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, WorkerleaseError), (404, NotFound), (409, Conflict), (500, ServerError)],
)
def test_other_errors_are_not_retried(status: int, error: type[WorkerleaseError]) -> None:
    rec = Recorder(sequence(problem(status, "Nope", "no"), httpx.Response(200)))
    with pytest.raises(error) as caught:
        rec.client().renew_lease("l-0000000000000000000a")
    assert caught.value.status == status
    assert rec.calls("POST", "/renew") == 1 and rec.sleeps == []


def test_retries_run_out_into_a_typed_error() -> None:
    answers = [problem(503, "Service unavailable", "db down", headers={"Retry-After": "1"})] * 3
    rec = Recorder(sequence(*answers))
    with pytest.raises(ServiceUnavailable, match="db down"):
        rec.client(retry=Retry(attempts=3)).leases()
    assert rec.calls("GET", "/v1/leases") == 3 and rec.sleeps == [1.0, 1.0]

    rec = Recorder(sequence(*[httpx.ConnectError("refused")] * 2))
    with pytest.raises(ConnectionFailed):
        rec.client(retry=Retry(attempts=2)).leases()


def test_a_retry_after_beyond_the_limit_is_not_waited_for() -> None:
    rec = Recorder(
        sequence(problem(429, "Too many requests", "later", headers={"Retry-After": "3600"}))
    )
    with pytest.raises(RateLimited):
        rec.client().pools()
    assert rec.sleeps == []


def test_backoff_without_retry_after_is_jittered_and_capped() -> None:
    policy = Retry(base=0.5, cap=4)
    for attempt in range(10):
        assert 0 <= policy.backoff(attempt) <= min(4, 0.5 * 2**attempt)
    assert retry_after_seconds("12") == 12
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10
    assert retry_after_seconds("soon") is None


def test_problem_documents_become_typed_errors_with_their_fields() -> None:
    errors = [{"loc": ["body", "pool"], "msg": "bad", "type": "string_pattern_mismatch"}]
    rec = Recorder(sequence(problem(422, "Invalid request", "body.pool: bad", errors=errors)))
    with pytest.raises(ValidationError) as caught:
        rec.client().request_lease("Not A Pool")
    exc = caught.value
    assert (exc.status, exc.title, exc.detail) == (422, "Invalid request", "body.pool: bad")
    assert exc.errors == errors
    assert str(exc) == "Invalid request: body.pool: bad"

    rec = Recorder(sequence(httpx.Response(502, text="<html>bad gateway</html>")))
    with pytest.raises(ServerError) as server_error:
        rec.client().pools()
    assert server_error.value.status == 502


def test_configuration_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORKERLEASE_URL", raising=False)
    monkeypatch.delenv("WORKERLEASE_TOKEN", raising=False)
    with pytest.raises(WorkerleaseError, match="WORKERLEASE_URL"):
        Client()
    monkeypatch.setenv("WORKERLEASE_URL", URL)
    with pytest.raises(WorkerleaseError, match="WORKERLEASE_TOKEN"):
        Client()
    monkeypatch.setenv("WORKERLEASE_TOKEN", "wlt_env")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"pools": []})

    with Client(transport=httpx.MockTransport(handler)) as client:
        client.pools()
    assert seen[0].headers["Authorization"] == "Bearer wlt_env"
    assert str(seen[0].url) == f"{URL}/v1/pools"
