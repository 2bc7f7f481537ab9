"""The SDK against ``httpx.MockTransport``: retry rules, typed errors, the log iterator,
waiting for a worker, and what a ``with`` block releases. No server, no sleeping:
the client's ``sleep`` is recorded instead."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from workerlease_client import (
    Client,
    Conflict,
    ConnectionFailed,
    LeaseEnded,
    LeaseTimeout,
    NotFound,
    RateLimited,
    Retry,
    ServerError,
    ServiceUnavailable,
    ValidationError,
    WorkerleaseError,
)
from workerlease_client._http import retry_after_seconds
from workerlease_client.lease import renew_delay
from workerlease_client.models import LeaseInfo

URL = "http://wl.test"
Handler = Callable[[httpx.Request], httpx.Response]


def lease_json(
    state: str = "active", lease_id: str = "l-0000000000000000000a", **extra: Any
) -> Any:
    now = datetime.now(UTC)
    body = {
        "id": lease_id,
        "tenant_id": "t-00000000000000000001",
        "pool": "hosted-ubuntu",
        "state": state,
        "created_at": now.isoformat(),
        "activated_at": now.isoformat() if state == "active" else None,
        "idle_expires_at": (now + timedelta(hours=1)).isoformat() if state == "active" else None,
        "expires_at": None,
        "ended_at": None,
        "end_reason": None,
        "worker": None,
    }
    body.update(extra)
    return body


def task_json(state: str = "queued", exit_code: int | None = None) -> Any:
    return {
        "id": "t-0000000000000000000b",
        "lease_id": "l-0000000000000000000a",
        "state": state,
        "exit_code": exit_code,
        "error": None,
        "created_at": datetime.now(UTC).isoformat(),
        "started_at": None,
        "finished_at": None,
        "shell": "sh",
        "timeout_s": 3600,
        "container": None,
        "log_bytes": 0,
    }


def problem(status: int, title: str, detail: str, **extra: Any) -> httpx.Response:
    return httpx.Response(
        status,
        json={"type": "about:blank", "status": status, "title": title, "detail": detail, **extra},
        headers={"Content-Type": "application/problem+json", **extra.pop("headers", {})},
    )


class Recorder:
    """A MockTransport whose answers are scripted per call; records the requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    def client(self, **kwargs: Any) -> Client:
        return Client(
            URL,
            "wlt_test",
            transport=httpx.MockTransport(self),
            sleep=self.sleeps.append,
            **kwargs,
        )

    def calls(self, method: str, path_part: str) -> int:
        return sum(1 for r in self.requests if r.method == method and path_part in r.url.path)


def sequence(*answers: httpx.Response | Exception) -> Handler:
    """Answer the n-th request with the n-th item (an exception is raised)."""
    items = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        item = items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    return handler


# ---- retries -------------------------------------------------------------------------


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


# ---- errors --------------------------------------------------------------------------


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


# ---- tasks ---------------------------------------------------------------------------


def test_the_log_iterator_follows_offsets_and_keeps_split_characters_whole() -> None:
    text = "héllo wörld ✓ done\n"
    data = text.encode()
    offsets: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        offset = int(request.url.params["offset"])
        offsets.append(offset)
        piece = data[offset : offset + 1]  # one byte per answer: every character split
        end = offset + len(piece)
        state = "succeeded" if end >= len(data) else "running"
        return httpx.Response(
            200,
            content=piece,
            headers={"X-Next-Offset": str(end), "X-Task-State": state},
        )

    rec = Recorder(handler)
    chunks = list(rec.client().follow_log("l-0000000000000000000a", "t-0000000000000000000b"))
    assert "".join(chunks) == text
    assert "\ufffd" not in "".join(chunks)
    assert offsets == [*range(len(data)), len(data)]  # no byte asked twice, one empty end
    assert all(r.url.params["wait_seconds"] == "30" for r in rec.requests)


def test_submit_sends_files_as_base64_and_the_options(tmp_path: Path) -> None:
    local = tmp_path / "deploy.yaml"
    local.write_bytes(b"kind: Deployment\n")
    rec = Recorder(sequence(httpx.Response(201, json=task_json())))
    rec.client().submit_task(
        "l-0000000000000000000a",
        "kubectl apply -f deploy.yaml",
        image="bitnami/kubectl:1.31",
        files={"deploy.yaml": local, "raw.bin": b"\x00\xff"},
        env={"A": "1"},
        timeout=60,
        shell="bash",
    )
    body = json.loads(rec.requests[0].content)
    assert body == {
        "script": "kubectl apply -f deploy.yaml",
        "container": {"image": "bitnami/kubectl:1.31"},
        "files": {
            "deploy.yaml": base64.b64encode(b"kind: Deployment\n").decode(),
            "raw.bin": base64.b64encode(b"\x00\xff").decode(),
        },
        "env": {"A": "1"},
        "timeout_s": 60,
        "shell": "bash",
    }
    with pytest.raises(TypeError, match=r"pathlib\.Path"):
        rec.client().submit_task("l-0000000000000000000a", "x", files={"a": "not bytes"})  # type: ignore[dict-item]


class FakeService:
    """Just enough of the tenant API, in memory, for lease and task flows."""

    def __init__(self, pending_polls: int = 0, log: bytes = b"out\n", exit_code: int = 0) -> None:
        self.pending_polls = pending_polls
        self.log = log
        self.exit_code = exit_code
        self.state = "none"
        self.task_state = "running"
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        with self.lock:
            if method == "POST" and path == "/v1/leases":
                self.state = "pending" if self.pending_polls else "active"
                return httpx.Response(
                    202 if self.pending_polls else 201, json=lease_json(self.state)
                )
            if method == "GET" and path.startswith("/v1/leases/") and path.count("/") == 3:
                if self.state == "pending" and self.pending_polls > 0:  # < 0: pending forever
                    self.pending_polls -= 1
                    if self.pending_polls <= 0:
                        self.state = "active"
                return httpx.Response(200, json=lease_json(self.state))
            if method == "DELETE":
                self.state = "released"
                return httpx.Response(200, json=lease_json("released"))
            if path.endswith("/renew"):
                if self.state != "active":
                    return problem(409, "Conflict", "lease has ended")
                return httpx.Response(200, json=lease_json())
            if method == "POST" and path.endswith("/tasks"):
                return httpx.Response(201, json=task_json("running"))
            if path.endswith("/cancel"):
                self.task_state = "cancelled"
                return httpx.Response(202, json=task_json("cancelled"))
            if path.endswith("/log"):
                offset = int(request.url.params["offset"])
                piece = self.log[offset:]
                done = self.task_state != "running" or not piece
                if done and self.task_state == "running":
                    self.task_state = "succeeded" if self.exit_code == 0 else "failed"
                return httpx.Response(
                    200,
                    content=piece,
                    headers={
                        "X-Next-Offset": str(offset + len(piece)),
                        "X-Task-State": self.task_state,
                    },
                )
            if method == "GET" and "/tasks/" in path:
                ended = self.task_state != "running"
                code = self.exit_code if self.task_state in ("succeeded", "failed") else None
                return httpx.Response(200, json=task_json(self.task_state, code if ended else None))
        return problem(404, "Not found", f"{method} {path}")


def test_run_returns_exit_code_state_and_log_and_the_with_block_releases() -> None:
    service = FakeService(log="ça marche\n".encode(), exit_code=3)
    rec = Recorder(service)
    seen: list[str] = []
    with rec.client() as wl, wl.lease("hosted-ubuntu", wait=10, renew=False) as lease:
        result = lease.run("false", on_output=seen.append)
    assert (result.exit_code, result.state, result.log) == (3, "failed", "ça marche\n")
    assert "".join(seen) == result.log
    assert service.state == "released"


def test_an_exception_in_the_block_releases_the_lease_and_cancels_the_running_task() -> None:
    service = FakeService(log=b"line\n" * 3)
    rec = Recorder(service)

    def boom(_: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), rec.client() as wl, wl.lease("hosted-ubuntu") as lease:
        lease.run("sleep 100", on_output=boom)
    assert service.task_state == "cancelled"
    assert service.state == "released"
    assert rec.calls("DELETE", "/v1/leases/") == 1

    service = FakeService()
    rec = Recorder(service)
    with pytest.raises(RuntimeError), rec.client() as wl, wl.lease("hosted-ubuntu"):
        raise RuntimeError("the caller's own failure")
    assert service.state == "released"


def test_waiting_for_a_worker_long_polls_then_times_out_and_releases_the_pending_lease() -> None:
    service = FakeService(pending_polls=-1)
    rec = Recorder(service)
    waits: list[float] = []
    stop = threading.Event()

    def on_wait(lease: LeaseInfo, waited: float) -> None:
        waits.append(waited)
        stop.wait(0.05)  # the fake answers a long poll at once

    with pytest.raises(LeaseTimeout, match="released"), rec.client() as wl:
        wl.acquire("hosted-ubuntu", wait=0.3, on_wait=on_wait)
    assert service.state == "released"
    post = json.loads(rec.requests[0].content)
    assert post == {"pool": "hosted-ubuntu", "wait_seconds": 0}  # the id first, then the wait
    polls = [r for r in rec.requests if r.method == "GET"]
    assert polls and all(r.url.params["wait_seconds"] == "1" for r in polls)
    assert waits


def test_waiting_for_a_worker_uses_long_polls_of_at_most_60_seconds() -> None:
    service = FakeService(pending_polls=2)
    rec = Recorder(service)
    lease = rec.client().acquire("hosted-ubuntu", wait=600)
    assert lease.state == "active"
    polls = [r.url.params["wait_seconds"] for r in rec.requests if r.method == "GET"]
    assert polls == ["60", "60"]


def test_ctrl_c_while_waiting_for_a_worker_releases_the_pending_lease() -> None:
    service = FakeService(pending_polls=-1)
    rec = Recorder(service)

    def interrupt(lease: LeaseInfo, waited: float) -> None:
        raise KeyboardInterrupt

    with (
        pytest.raises(KeyboardInterrupt),
        rec.client() as wl,
        wl.lease("hosted-ubuntu", on_wait=interrupt),
    ):
        raise AssertionError("never entered")
    assert service.state == "released"


def test_a_pending_lease_that_fails_raises_lease_ended() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json=lease_json("pending"))
        if request.method == "DELETE":
            return httpx.Response(200, json=lease_json("failed", end_reason="failed"))
        return httpx.Response(200, json=lease_json("failed", end_reason="failed"))

    with pytest.raises(LeaseEnded, match="failed"):
        Recorder(handler).client().acquire("hosted-ubuntu", wait=30)


def test_the_renewer_renews_before_the_idle_deadline_and_stops_when_the_lease_ended() -> None:
    renewed = threading.Event()
    count = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal count
        if request.url.path.endswith("/renew"):
            count += 1
            if count >= 3:
                renewed.set()
                return problem(409, "Conflict", "lease has ended (idle_timeout)")
        soon = datetime.now(UTC) + timedelta(seconds=1.2)
        return httpx.Response(200, json=lease_json(idle_expires_at=soon.isoformat()))

    with Recorder(handler).client() as wl:
        lease = wl.lease("hosted-ubuntu")
        with lease:
            assert renewed.wait(30), "no renew within 30 s"
            for _ in range(300):
                if lease.ended is not None:
                    break
                renewed.wait(0.1)
            assert isinstance(lease.ended, Conflict)


def test_renew_delay_is_half_the_time_left_on_the_earlier_clock() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    info = LeaseInfo.from_json(
        lease_json(idle_expires_at=(now + timedelta(seconds=60)).isoformat())
    )
    assert renew_delay(info, now) == 30
    # The service's clock is 20 s ahead of ours: less is left than our clock says.
    skewed = LeaseInfo.from_json(
        lease_json(idle_expires_at=(now + timedelta(seconds=60)).isoformat()),
        server_time=now + timedelta(seconds=20),
        received_at=now,
    )
    assert renew_delay(skewed, now) == pytest.approx((60 - 21) / 2)
    late = LeaseInfo.from_json(lease_json(idle_expires_at=(now - timedelta(seconds=5)).isoformat()))
    assert renew_delay(late, now) == 0.5


def test_leases_follows_next_offset_to_the_last_page() -> None:
    pages = {
        None: {"leases": [lease_json(lease_id="l-00000000000000000001")], "next_offset": 1},
        "1": {"leases": [lease_json(lease_id="l-00000000000000000002")], "next_offset": None},
    }
    rec = Recorder(
        lambda request: httpx.Response(200, json=pages[request.url.params.get("offset")])
    )
    leases = rec.client().leases("all")
    assert [lease.id for lease in leases] == ["l-00000000000000000001", "l-00000000000000000002"]
    assert [r.url.params.get("state") for r in rec.requests] == ["all", "all"]
