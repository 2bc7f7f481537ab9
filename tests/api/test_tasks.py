"""Tasks through the service, with the agent's side played by the test (docs/tasks.md).

The fake provisioner's workers have no agent; the test polls, sends output and
finishes as an agent would, with the worker token the ready callback gave it. The
real agent against a real ``serve`` is in tests/integration/local/test_tasks.py.
"""

from __future__ import annotations

import base64
import threading
import time
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import select
from werkzeug.test import TestResponse

from service.db import session_factory, session_scope
from service.models import Event, Task
from tests.api.helpers import POOL, lease_row, request_lease, worker_state
from tests.conftest import ADMIN_TOKEN, Service, bearer, pool_config


@pytest.fixture
def pools() -> list[dict[str, Any]]:
    return [
        pool_config(max_concurrent_tasks=2, capabilities=["execution-containers"]),
        pool_config("plain", min_ready=1, lease_idle_timeout="5m"),
    ]


@pytest.fixture
def settings() -> dict[str, Any]:
    return {"task_log_limit": 64 << 10, "task_retention": "1d"}


class Tenant:
    def __init__(self, svc: Service, name: str, pool: str = POOL) -> None:
        self.svc = svc
        self.token = svc.tenant(name)["token"]
        self.lease = request_lease(svc.client, self.token, pool).get_json()
        assert self.lease["state"] == "active", self.lease

    @property
    def worker_id(self) -> str:
        return str(self.lease["worker"]["id"])

    @property
    def worker_token(self) -> str:
        return self.svc.worker_tokens[self.worker_id]

    def submit(self, lease_id: str | None = None, **body: Any) -> TestResponse:
        body.setdefault("script", "echo hello")
        return self.svc.client.post(
            f"/v1/leases/{lease_id or self.lease['id']}/tasks",
            json=body,
            headers=bearer(self.token),
        )

    def task(
        self, task_id: str, suffix: str = "", lease_id: str | None = None, **query: Any
    ) -> TestResponse:
        return self.svc.client.get(
            f"/v1/leases/{lease_id or self.lease['id']}/tasks/{task_id}{suffix}",
            query_string=query,
            headers=bearer(self.token),
        )

    def cancel(self, task_id: str) -> TestResponse:
        return self.svc.client.post(
            f"/v1/leases/{self.lease['id']}/tasks/{task_id}/cancel", headers=bearer(self.token)
        )

    def release(self) -> None:
        response = self.svc.client.delete(
            f"/v1/leases/{self.lease['id']}", headers=bearer(self.token)
        )
        assert response.status_code == 200


class Agent:
    """What images/agent does, as calls on the test client."""

    def __init__(self, svc: Service, worker_id: str, token: str | None = None) -> None:
        self.svc = svc
        self.worker_id = worker_id
        self.token = token or svc.worker_tokens[worker_id]

    def poll(self, running: list[str] | None = None) -> TestResponse:
        return self.svc.client.post(
            f"/v1/workers/{self.worker_id}/poll",
            json={"running": running or [], "wait_seconds": 0},
            headers=bearer(self.token),
        )

    def send(self, task_id: str, offset: int, data: bytes) -> TestResponse:
        return self.svc.client.post(
            f"/v1/workers/{self.worker_id}/tasks/{task_id}/log",
            query_string={"offset": offset},
            data=data,
            headers={**bearer(self.token), "Content-Type": "application/octet-stream"},
        )

    def finish(self, task_id: str, log_bytes: int, **body: Any) -> TestResponse:
        body.setdefault("outcome", "exited")
        body.setdefault("exit_code", 0)
        return self.svc.client.post(
            f"/v1/workers/{self.worker_id}/tasks/{task_id}/finish",
            json={"log_bytes": log_bytes, **body},
            headers=bearer(self.token),
        )


def _task_row(svc: Service, task_id: str) -> Task:
    with session_scope(session_factory(svc.engine)) as session:
        task = session.get(Task, task_id)
        assert task is not None
        return task


@pytest.fixture
def acme(svc: Service) -> Tenant:
    svc.warm()
    return Tenant(svc, "acme")


def test_a_task_runs_through_the_service_with_its_log_exact(svc: Service, acme: Tenant) -> None:
    files = {"conf/app.yaml": base64.b64encode(b"replicas: 3\n").decode()}
    submitted = acme.submit(script="cat conf/app.yaml", env={"DB_PASSWORD": "s3cret"}, files=files)
    assert submitted.status_code == 201, submitted.get_json()
    task = submitted.get_json()
    assert submitted.headers["Location"].endswith(
        f"/v1/leases/{acme.lease['id']}/tasks/{task['id']}"
    )
    assert (task["state"], task["shell"], task["timeout_s"], task["log_bytes"]) == (
        "queued",
        "sh",
        3600,
        0,
    )
    assert "env" not in task and "script" not in task and "files" not in task

    agent = Agent(svc, acme.worker_id)
    handed = agent.poll().get_json()
    assert handed["cancel"] == []
    [assignment] = handed["tasks"]
    assert assignment["id"] == task["id"]
    assert assignment["env"] == {"DB_PASSWORD": "s3cret"} and assignment["files"] == files
    assert acme.task(task["id"]).get_json()["state"] == "running"

    assert agent.send(task["id"], 0, b"replicas: ").get_json()["received"] == 10
    # A retried chunk overlapping what was stored keeps only its new tail.
    assert agent.send(task["id"], 0, b"replicas: 3\n").get_json()["received"] == 12
    # A chunk after a gap is not stored; the agent resends from "received".
    assert agent.send(task["id"], 20, b"lost").get_json()["received"] == 12

    first = acme.task(task["id"], "/log", offset=0)
    assert first.status_code == 200 and first.data == b"replicas: 3\n"
    assert first.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert (first.headers["X-Next-Offset"], first.headers["X-Task-State"]) == ("12", "running")
    middle = acme.task(task["id"], "/log", offset=4)
    assert middle.data == b"icas: 3\n"

    missing = agent.finish(task["id"], log_bytes=15)
    assert missing.status_code == 409 and missing.get_json()["received"] == 12
    assert agent.finish(task["id"], log_bytes=12).get_json() == {"state": "succeeded"}
    done = acme.task(task["id"]).get_json()
    assert (done["state"], done["exit_code"], done["error"], done["log_bytes"]) == (
        "succeeded",
        0,
        None,
        12,
    )
    end = acme.task(task["id"], "/log", offset=12)
    assert (end.data, end.headers["X-Task-State"]) == (b"", "succeeded")
    assert acme.task(task["id"], "/log", offset=13).status_code == 416
    assert acme.task(task["id"], "/log", offset=1 << 47).status_code == 416
    # What may hold secrets is gone from the database once the task ended.
    assert _task_row(svc, task["id"]).payload is None
    # A finish repeated (its answer was lost) changes nothing.
    assert agent.finish(task["id"], log_bytes=12, exit_code=3).get_json() == {"state": "succeeded"}


def test_exit_codes_timeouts_and_starts_that_failed(svc: Service, acme: Tenant) -> None:
    agent = Agent(svc, acme.worker_id)
    ids = [acme.submit().get_json()["id"] for _ in range(2)]
    agent.poll()
    agent.finish(ids[0], 0, exit_code=3)
    agent.finish(ids[1], 0, outcome="timed_out", exit_code=None)
    more = [acme.submit().get_json()["id"]]
    agent.poll()
    agent.finish(more[0], 0, outcome="failed_to_start", exit_code=None, error="no such image")
    states = [acme.task(i).get_json() for i in [*ids, *more]]
    assert [(t["state"], t["exit_code"]) for t in states] == [
        ("failed", 3),
        ("timed_out", None),
        ("failed", None),
    ]
    assert states[1]["error"] == "killed after timeout_s=3600"
    assert states[2]["error"] == "no such image"


def test_at_most_max_concurrent_tasks_run_and_the_rest_wait_in_order(
    svc: Service, acme: Tenant
) -> None:
    agent = Agent(svc, acme.worker_id)
    ids = [acme.submit(script=f"echo {n}").get_json()["id"] for n in range(4)]
    first = [t["id"] for t in agent.poll().get_json()["tasks"]]
    assert first == ids[:2]
    assert agent.poll(first).get_json() == {"tasks": [], "cancel": []}
    agent.finish(ids[0], 0)
    assert [t["id"] for t in agent.poll([ids[1]]).get_json()["tasks"]] == [ids[2]]
    assert [acme.task(i).get_json()["state"] for i in ids] == [
        "succeeded",
        "running",
        "running",
        "queued",
    ]


def test_a_handed_out_task_the_agent_does_not_list_is_handed_out_again(
    svc: Service, acme: Tenant
) -> None:
    agent = Agent(svc, acme.worker_id)
    task_id = acme.submit().get_json()["id"]
    agent.poll()  # this answer "was lost on the way"
    again = agent.poll([]).get_json()["tasks"]
    assert [t["id"] for t in again] == [task_id]
    assert again[0]["script"] == "echo hello"


def test_cancel_queued_and_running_tasks(svc: Service, acme: Tenant) -> None:
    agent = Agent(svc, acme.worker_id)
    running, second, queued = (acme.submit().get_json()["id"] for _ in range(3))
    agent.poll()
    cancelled = acme.cancel(queued)
    assert cancelled.status_code == 202 and cancelled.get_json()["state"] == "cancelled"
    asked = acme.cancel(running)
    assert asked.status_code == 202 and asked.get_json()["state"] == "running"
    assert agent.poll([running, second]).get_json()["cancel"] == [running]
    assert agent.send(running, 0, b"bye\n").get_json()["cancel"] is True
    assert agent.finish(running, 4, outcome="cancelled", exit_code=None).get_json() == {
        "state": "cancelled"
    }
    ended = acme.cancel(running)
    assert ended.status_code == 200
    assert (ended.get_json()["state"], ended.get_json()["error"]) == (
        "cancelled",
        "cancelled by the tenant",
    )


def test_a_lease_that_ends_ends_its_tasks_and_revokes_the_worker_token(
    svc: Service, acme: Tenant
) -> None:
    agent = Agent(svc, acme.worker_id)
    running, _other, queued = (acme.submit().get_json()["id"] for _ in range(3))
    agent.poll()
    acme.release()
    after = {i: acme.task(i).get_json() for i in (running, queued)}
    assert after[running]["state"] == "cancelled"
    assert after[running]["error"] == "the lease ended (released) while the task was running"
    assert after[queued]["state"] == "cancelled"
    assert acme.submit().status_code == 409
    # Its agent's credential died with the lease: the worker is being destroyed.
    assert agent.poll().status_code == 401
    assert agent.finish(running, 0).status_code == 401


def test_a_running_task_holds_off_the_idle_timeout(svc: Service) -> None:
    svc.warm()
    tenant = Tenant(svc, "idle", pool="plain")
    agent = Agent(svc, tenant.worker_id)
    task_id = tenant.submit().get_json()["id"]
    agent.poll()
    svc.clock.advance(minutes=30)
    svc.tick()
    assert lease_row(svc, tenant.lease["id"]).state == "active"
    agent.finish(task_id, 0)
    svc.clock.advance(minutes=4)
    svc.tick()
    assert lease_row(svc, tenant.lease["id"]).state == "active"  # idle clock restarted at the end
    svc.clock.advance(minutes=2)
    svc.tick()
    assert lease_row(svc, tenant.lease["id"]).end_reason == "idle_timeout"


def test_the_log_is_capped_with_one_marker_and_the_task_runs_on(svc: Service, acme: Tenant) -> None:
    agent = Agent(svc, acme.worker_id)
    task_id = acme.submit().get_json()["id"]
    agent.poll()
    chunk = b"x" * (40 << 10)
    assert agent.send(task_id, 0, chunk).get_json()["discard"] is False
    ack = agent.send(task_id, len(chunk), chunk).get_json()
    assert (ack["received"], ack["discard"]) == (2 * len(chunk), True)
    # The agent may stop sending: the finish is accepted without the dropped bytes.
    assert agent.finish(task_id, 3 * len(chunk)).get_json() == {"state": "succeeded"}
    log = acme.task(task_id, "/log", offset=0).data
    marker = b"\n[workerlease: output beyond 65536 bytes was dropped]\n"
    assert log == b"x" * (64 << 10) + marker


def test_silent_agents_and_old_tasks_are_swept(svc: Service, acme: Tenant) -> None:
    agent = Agent(svc, acme.worker_id)
    unconfirmed = acme.submit().get_json()["id"]
    silent = acme.submit(timeout_s=60).get_json()["id"]
    agent.poll()
    acme.cancel(unconfirmed)
    svc.clock.advance(seconds=31)
    svc.tick()
    assert acme.task(unconfirmed).get_json()["state"] == "cancelled"
    svc.clock.advance(seconds=150)
    svc.tick()
    lost = acme.task(silent).get_json()
    assert lost["state"] == "lost" and "no result from worker" in lost["error"]
    svc.clock.advance(days=1, seconds=1)
    svc.tick()
    assert acme.task(silent).status_code == 404


def test_tenants_cannot_see_or_touch_each_others_tasks(svc: Service, acme: Tenant) -> None:
    other = Tenant(svc, "other")
    task_id = acme.submit().get_json()["id"]
    lease_id = acme.lease["id"]
    for response in (
        other.submit(lease_id=lease_id),
        svc.client.get(f"/v1/leases/{lease_id}/tasks", headers=bearer(other.token)),
        svc.client.get(f"/v1/leases/{lease_id}/tasks/{task_id}", headers=bearer(other.token)),
        svc.client.get(f"/v1/leases/{lease_id}/tasks/{task_id}/log", headers=bearer(other.token)),
        svc.client.post(
            f"/v1/leases/{lease_id}/tasks/{task_id}/cancel", headers=bearer(other.token)
        ),
        # Its own lease id with another lease's task id: still nothing.
        svc.client.get(
            f"/v1/leases/{other.lease['id']}/tasks/{task_id}", headers=bearer(other.token)
        ),
    ):
        assert response.status_code == 404, response.get_json()
    assert acme.task(task_id).get_json()["state"] == "queued"
    # Another worker's agent cannot take, feed or finish it either.
    foreign = Agent(svc, other.worker_id)
    assert foreign.poll().get_json()["tasks"] == []
    assert foreign.send(task_id, 0, b"x").status_code == 404
    assert foreign.finish(task_id, 0).status_code == 404


def test_worker_tokens_and_tenant_tokens_never_stand_in_for_each_other(
    svc: Service, acme: Tenant
) -> None:
    worker_token = acme.worker_token
    tenant_as_worker = Agent(svc, acme.worker_id, token=acme.token)
    admin_as_worker = Agent(svc, acme.worker_id, token=ADMIN_TOKEN)
    access_as_worker = Agent(svc, acme.worker_id, token=acme.lease["worker"]["access_token"])
    for agent in (tenant_as_worker, admin_as_worker, access_as_worker):
        assert agent.poll().status_code == 401
    other_worker = next(w for w in svc.worker_tokens if w != acme.worker_id)
    assert Agent(svc, other_worker, token=worker_token).poll().status_code == 401
    for call in (
        svc.client.get("/v1/leases", headers=bearer(worker_token)),
        svc.client.post("/v1/leases", json={"pool": POOL}, headers=bearer(worker_token)),
        svc.client.get(f"/v1/leases/{acme.lease['id']}/tasks", headers=bearer(worker_token)),
        svc.client.get("/v1/admin/pools", headers=bearer(worker_token)),
    ):
        assert call.status_code == 401


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"files": {"../etc/passwd": "eA=="}}, "files"),
        ({"files": {"/etc/passwd": "eA=="}}, "files"),
        ({"files": {"a\\b": "eA=="}}, "files"),
        ({"files": {"C:/x": "eA=="}}, "files"),
        ({"files": {"a//b": "eA=="}}, "files"),
        ({"files": {"ok.txt": "not base64!"}}, "files"),
        ({"env": {"1BAD": "x"}}, "env"),
        ({"env": {f"V{n}": "x" for n in range(65)}}, "env"),
        ({"env": {"BIG": "x" * (32 * 1024 + 1)}}, "env"),
        ({"script": "x" * ((1 << 20) + 1)}, "script"),
        ({"script": ""}, "script"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": 86401}, "timeout_s"),
        ({"shell": "zsh"}, "shell"),
        ({"container": {"image": "--privileged"}}, "container"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_task_bodies_are_422_and_create_nothing(
    svc: Service, acme: Tenant, body: dict[str, Any], where: str
) -> None:
    response = acme.submit(**body)
    assert response.status_code == 422, response.get_json()
    assert where in response.get_json()["detail"]
    assert svc.client.get(
        f"/v1/leases/{acme.lease['id']}/tasks", headers=bearer(acme.token)
    ).get_json() == {"tasks": [], "next_offset": None}


def test_files_are_bounded_in_total_and_bodies_over_16_mib_are_413(
    svc: Service, acme: Tenant
) -> None:
    half = base64.b64encode(b"\0" * (11 << 19)).decode()  # 5.5 MiB each, 11 MiB in all
    too_much = acme.submit(files={"a.bin": half, "b.bin": half})
    assert too_much.status_code == 422 and "files" in too_much.get_json()["detail"]
    huge = acme.submit(script="x" * (17 << 20))
    assert huge.status_code == 413


def test_containers_only_on_pools_that_can_run_them(svc: Service, acme: Tenant) -> None:
    ok = acme.submit(container={"image": "alpine:3.20"})
    assert ok.status_code == 201 and ok.get_json()["container"] == {"image": "alpine:3.20"}
    plain = Tenant(svc, "plain-user", pool="plain")
    refused = plain.submit(container={"image": "alpine:3.20"})
    assert refused.status_code == 422
    assert "execution-containers" in refused.get_json()["detail"]


def test_tasks_of_pending_and_ended_leases_are_409(svc: Service) -> None:
    token = svc.tenant("early")["token"]
    pending = request_lease(svc.client, token).get_json()  # nothing warm yet: pending
    assert pending["state"] == "pending"
    response = svc.client.post(
        f"/v1/leases/{pending['id']}/tasks", json={"script": "true"}, headers=bearer(token)
    )
    assert response.status_code == 409 and "pending" in response.get_json()["detail"]


def test_task_starts_and_ends_are_audited_without_secrets(svc: Service, acme: Tenant) -> None:
    task_id = acme.submit(env={"TOKEN": "hunter2-secret"}).get_json()["id"]
    agent = Agent(svc, acme.worker_id)
    agent.poll()
    agent.finish(task_id, 0, exit_code=7)
    events = svc.client.get(
        "/v1/admin/events", query_string={"limit": 1000}, headers=bearer(ADMIN_TOKEN)
    ).get_json()["events"]
    reasons = " | ".join(e["reason"] for e in events if e["subject_id"] == task_id)
    assert "submitted on lease" in reasons and f"worker {acme.worker_id}" in reasons
    assert "exit code 7" in reasons and "hunter2" not in reasons
    with session_scope(session_factory(svc.engine)) as session:
        kinds = session.exec(select(Event.kind).where(Event.subject_id == task_id)).all()
    assert kinds.count("task") >= 3  # submitted, started, ended


def test_env_and_files_are_encrypted_at_rest(svc: Service, acme: Tenant) -> None:
    task_id = acme.submit(env={"TOKEN": "hunter2-secret"}).get_json()["id"]
    with svc.engine.connect() as connection:
        raw = connection.execute(
            text("SELECT payload FROM tasks WHERE id = :id"), {"id": task_id}
        ).scalar_one()
    assert raw.startswith("fernet:") and "hunter2" not in raw
    assert worker_state(svc, acme.worker_id) == "leased"


def _race_finish_and_release(app: Any, svc: Service, tenant: Tenant, finish_first: bool) -> str:
    svc.tick()
    svc.agents_report_ready()
    lease = request_lease(svc.client, tenant.token).get_json()
    assert lease["state"] == "active", lease
    task_id = svc.client.post(
        f"/v1/leases/{lease['id']}/tasks", json={"script": "true"}, headers=bearer(tenant.token)
    ).get_json()["id"]
    agent = Agent(
        Service(app.test_client(), svc.rt, svc.clock, svc.cloud, svc.engine),
        lease["worker"]["id"],
        token=svc.worker_tokens[lease["worker"]["id"]],
    )
    agent.poll()
    tenant_client = app.test_client()
    answers: list[int] = []

    def finish() -> None:
        answers.append(agent.finish(task_id, 0).status_code)

    def release() -> None:
        path = f"/v1/leases/{lease['id']}"
        answers.append(tenant_client.delete(path, headers=bearer(tenant.token)).status_code)

    threads = [threading.Thread(target=call) for call in (finish, release)]
    if not finish_first:
        threads.reverse()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # The finish may come after its worker's credential died with the lease (401).
    assert len(answers) == 2 and all(code in (200, 401) for code in answers), answers
    state: str = tenant.task(task_id, lease_id=lease["id"]).get_json()["state"]
    return state


def test_a_finish_racing_the_lease_end_never_fails_or_deadlocks(
    app: Any, svc: Service, acme: Tenant
) -> None:
    """Ending a task touches its lease; ending a lease touches its tasks. Both orders at
    once, many times: every answer is a 2xx (or the 401 of a credential that died with
    the lease), and every task ends once."""
    acme.release()
    ended = [_race_finish_and_release(app, svc, acme, n % 2 == 0) for n in range(12)]
    assert set(ended) <= {"succeeded", "cancelled"}, ended


def test_the_task_list_is_paged_oldest_first(svc: Service, acme: Tenant) -> None:
    ids = [acme.submit(script=f"echo {n}").get_json()["id"] for n in range(5)]
    seen: list[str] = []
    query: dict[str, Any] = {"limit": 2}
    while True:
        page = svc.client.get(
            f"/v1/leases/{acme.lease['id']}/tasks", query_string=query, headers=bearer(acme.token)
        ).get_json()
        seen += [task["id"] for task in page["tasks"]]
        if page["next_offset"] is None:
            break
        query["offset"] = page["next_offset"]
    assert seen == ids


def _wait_for(condition: Any, message: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.01)


def test_followers_waiting_for_more_get_exactly_the_bytes_that_came(
    svc: Service, acme: Tenant
) -> None:
    """A follower waiting at the log's end is handed the chunk that lands there; one
    waiting past it (at an offset inside that chunk) reads its part from the database."""
    task_id = acme.submit().get_json()["id"]
    agent = Agent(svc, acme.worker_id)
    assert agent.poll().status_code == 200
    assert agent.send(task_id, 0, b"one\n").get_json()["received"] == 4
    answers: dict[str, TestResponse] = {}

    def follow(name: str, offset: int) -> None:
        answers[name] = acme.task(task_id, "/log", offset=offset, wait_seconds=30)

    followers = [
        threading.Thread(target=follow, args=("at_end", 4)),
        threading.Thread(target=follow, args=("ahead", 6)),
    ]
    for thread in followers:
        thread.start()
    follows = svc.client.application.extensions["workerlease"].tasks.follows
    _wait_for(lambda: follows.waiting() == 2, "the two followers never waited")
    assert agent.send(task_id, 4, b"two\nthree\n").get_json()["received"] == 14
    for thread in followers:
        thread.join(timeout=60)
        assert not thread.is_alive()
    at_end, ahead = answers["at_end"], answers["ahead"]
    assert (at_end.status_code, at_end.data) == (200, b"two\nthree\n")
    assert (at_end.headers["X-Next-Offset"], at_end.headers["X-Task-State"]) == ("14", "running")
    assert (ahead.status_code, ahead.data) == (200, b"o\nthree\n")
    assert ahead.headers["X-Next-Offset"] == "14"
    # Both read on from there: no byte lost or repeated.
    assert acme.task(task_id, "/log", offset=0).data == b"one\ntwo\nthree\n"
    # Far past the end of a live log: nothing yet, and the next read starts there.
    beyond = acme.task(task_id, "/log", offset=1 << 47)
    assert (beyond.status_code, beyond.data, beyond.headers["X-Next-Offset"]) == (
        200,
        b"",
        str(1 << 47),
    )
    assert follows.waiting() == 0 and follows.handed(f"{task_id}@4") is None
