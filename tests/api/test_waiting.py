"""Requests that wait for a worker: one tenant cannot take every wait, and the waits end."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from werkzeug.test import TestResponse

from service.waiters import Waiters
from tests.api.helpers import POOL, lease_rows, request_lease
from tests.conftest import Service, pool_config


@pytest.fixture
def pools() -> list[dict[str, Any]]:
    return [
        pool_config(min_ready=0, max_workers=4),
        pool_config("other", min_ready=0),
        pool_config("third", min_ready=0),
    ]


@pytest.fixture
def settings() -> dict[str, Any]:
    return {"max_waits_per_tenant": 2}


def _eventually(condition: Callable[[], bool], message: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.01)


def test_a_tenant_beyond_its_waiting_requests_gets_429_and_others_still_wait(
    svc: Service,
) -> None:
    greedy, other = svc.tenant("greedy")["token"], svc.tenant("other")["token"]
    waiters = svc.client.application.extensions["workerlease"].flow.waiters
    answers: list[TestResponse] = []

    def wait_for_a_worker(token: str, pool: str) -> None:
        answers.append(request_lease(svc.client, token, pool, wait_seconds=60))

    held = [
        threading.Thread(target=wait_for_a_worker, args=(greedy, POOL)),
        threading.Thread(target=wait_for_a_worker, args=(greedy, "other")),
    ]
    for thread in held:
        thread.start()
    _eventually(lambda: waiters.waiting() == 2, "the first two requests never waited")

    refused = request_lease(svc.client, greedy, "third", wait_seconds=60)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "2"
    assert refused.content_type == "application/problem+json"
    assert lease_rows(svc) and all(lease.pool != "third" for lease in lease_rows(svc))
    without_waiting = request_lease(svc.client, greedy, "third")  # no wait: no slot needed
    assert without_waiting.status_code == 202

    another = threading.Thread(target=wait_for_a_worker, args=(other, POOL))
    another.start()  # the cap is per tenant: someone else still waits
    _eventually(lambda: waiters.waiting() == 3, "another tenant could not wait")

    svc.tick()  # workers for every pending lease, and their agents call back
    svc.agents_report_ready()
    svc.tick()
    svc.agents_report_ready()
    for thread in [*held, another]:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert sorted(a.status_code for a in answers) == [201, 201, 201]
    assert waiters.waiting() == 0


def test_one_poll_reads_every_waited_lease_at_once() -> None:
    calls: list[set[str]] = []
    settled: set[str] = set()

    def read(ids: Any) -> set[str]:
        calls.append(set(ids))
        return settled & set(ids)

    waiters = Waiters(read, recheck_s=0.01, per_owner=100)
    results: dict[str, bool] = {}
    leases = [f"l-{n:020d}" for n in range(50)]
    threads = [
        threading.Thread(
            target=lambda lease=lease: results.__setitem__(lease, waiters.wait(lease, 60))
        )
        for lease in leases
    ]
    for thread in threads:
        thread.start()
    _eventually(lambda: waiters.waiting() == 50, "not everyone waited")
    settled.update(leases)  # activated elsewhere (another replica): only the poll sees it
    for thread in threads:
        thread.join(timeout=60)
    assert results == dict.fromkeys(leases, True)
    # Polls read all waited leases together: far fewer reads than waiters.
    assert any(len(ids) == 50 for ids in calls)


def test_a_failing_poll_is_counted_and_the_wait_still_ends() -> None:
    def broken(_ids: Any) -> set[str]:
        raise ConnectionError("database unreachable")

    waiters = Waiters(broken, recheck_s=0.01)
    assert waiters.wait("l-1", 0.2) is False
    assert waiters.waiting() == 0


def test_a_pending_lease_can_be_long_polled_with_get(svc: Service) -> None:
    token = svc.tenant()["token"]
    lease = request_lease(svc.client, token).get_json()
    assert lease["state"] == "pending"
    waiters = svc.client.application.extensions["workerlease"].flow.waiters
    answers: list[TestResponse] = []
    poll = threading.Thread(
        target=lambda: answers.append(
            svc.client.get(
                f"/v1/leases/{lease['id']}?wait_seconds=60",
                headers={"Authorization": f"Bearer {token}"},
            )
        )
    )
    poll.start()
    _eventually(lambda: waiters.waiting() == 1, "the GET never waited")
    svc.tick()
    svc.agents_report_ready()
    poll.join(timeout=60)
    assert not poll.is_alive()
    assert answers[0].status_code == 200
    assert answers[0].get_json()["state"] == "active"


def test_what_is_handed_to_a_key_reaches_its_waiters_and_goes_with_the_last() -> None:
    waiters = Waiters(lambda _ids: set(), recheck_s=60)
    waiters.hand("t-1@4", "nobody waits")  # no waiter: nothing is kept
    assert waiters.handed("t-1@4") is None
    got: list[object] = []

    def wait() -> None:
        with waiters.watch("t-1@4") as event:
            assert event.wait(60)
            got.append(waiters.handed("t-1@4"))

    threads = [threading.Thread(target=wait) for _ in range(2)]
    for thread in threads:
        thread.start()
    _eventually(lambda: waiters.waiting() == 2, "the waiters never waited")
    waiters.hand("t-1@9", "another key")
    waiters.hand("t-1@4", "the chunk")
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert got == ["the chunk", "the chunk"]
    assert waiters.waiting() == 0 and waiters.handed("t-1@4") is None
