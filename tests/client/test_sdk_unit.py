"""The SDK against ``httpx.MockTransport``: the log iterator, files, waiting for a worker,
what a ``with`` block releases and cancels, and the background renew."""

from __future__ import annotations

import base64
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from workerlease_client import Conflict, LeaseEnded, LeaseTimeout
from workerlease_client.lease import renew_delay
from workerlease_client.models import LeaseInfo

from tests.client.mocks import FakeService, Recorder, lease_json, problem, sequence, task_json


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
            # The renewer records the refusal after its call returns: wait for that, with
            # a deadline (``renewed`` is set already, so waiting on it would not pause).
            deadline = time.monotonic() + 30
            while lease.ended is None and time.monotonic() < deadline:
                time.sleep(0.05)
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
