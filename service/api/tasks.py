"""Tenants' tasks on their leases' workers: ``/v1/leases/<id>/tasks`` (docs/tasks.md)."""

from __future__ import annotations

from typing import Any

from flask import Response, g, request, url_for
from flask_openapi3 import APIBlueprint

from service.api import BEARER, TENANT_TAG, problems, svc
from service.api.present import task_out
from service.auth import require_tenant
from service.models import LIVE_TASK_STATES
from service.schemas import (
    LeasePath,
    Page,
    TaskCreate,
    TaskList,
    TaskLogQuery,
    TaskOut,
    TaskPath,
)

bp = APIBlueprint(
    "tasks",
    __name__,
    url_prefix="/v1/leases",
    abp_tags=[TENANT_TAG],
    abp_security=BEARER,
    abp_responses=problems(401, 403, 404, 413, 422, 503),
)
bp.before_request(require_tenant)

# A script (1 MiB), files (10 MiB decoded, a third more as base64) and env (2 MiB).
MAX_TASK_BODY = 16 << 20


@bp.before_request
def _room_for_a_task() -> None:
    """Only a task submission may be this large; everything else keeps the app's limit.
    Runs after authentication, so nobody unauthenticated gets a large body read."""
    if request.endpoint == "tasks.submit_task":
        request.max_content_length = MAX_TASK_BODY


@bp.post("/<lease_id>/tasks", responses={201: TaskOut, **problems(409)})
def submit_task(path: LeasePath, body: TaskCreate) -> Any:
    """Run a script on the lease's worker (201; the agent picks it up at once)."""
    services = svc()
    task = services.tasks.submit(services.session(), g.tenant.id, path.lease_id, body)
    location = url_for("tasks.get_task", lease_id=task.lease_id, task_id=task.id)
    return task_out(task).model_dump(mode="json"), 201, {"Location": location}


@bp.get("/<lease_id>/tasks", responses={200: TaskList})
def list_tasks(path: LeasePath, query: Page) -> Any:
    """The lease's tasks, oldest first (also after the lease ended, for task_retention);
    a page of ``limit`` from ``offset``, and ``next_offset`` while there may be more."""
    services = svc()
    found = services.tasks.lease_tasks(
        services.session(), g.tenant.id, path.lease_id, query.limit, query.offset
    )
    return TaskList(
        tasks=[task_out(task) for task in found], next_offset=query.next_offset(len(found))
    ).model_dump(mode="json")


@bp.get("/<lease_id>/tasks/<task_id>", responses={200: TaskOut})
def get_task(path: TaskPath) -> Any:
    services = svc()
    task = services.tasks.task(services.session(), g.tenant.id, path.lease_id, path.task_id)
    return task_out(task).model_dump(mode="json")


LOG_RESPONSE = {
    "description": "The output from `offset` (stdout and stderr interleaved)",
    "content": {"text/plain; charset=utf-8": {"schema": {"type": "string"}}},
    "headers": {
        "X-Next-Offset": {
            "description": "Where the next read starts",
            "schema": {"type": "integer"},
        },
        "X-Task-State": {"description": "The task's state", "schema": {"type": "string"}},
    },
}


@bp.get(
    "/<lease_id>/tasks/<task_id>/log",
    responses={200: LOG_RESPONSE, **problems(416)},
)
def task_log(path: TaskPath, query: TaskLogQuery) -> Any:
    """Output from byte ``offset``; ``wait_seconds`` waits for more while the task runs.

    Follow a log by reading again from ``X-Next-Offset`` until ``X-Task-State`` is an
    end state and the body is empty: no byte is lost or repeated."""
    services = svc()
    part = services.tasks.read_log(
        services.session(),
        g.tenant.id,
        path.lease_id,
        path.task_id,
        query.offset,
        query.wait_seconds,
    )
    response = Response(part.data, mimetype="text/plain")
    response.headers["Content-Type"] = "text/plain; charset=utf-8"
    response.headers["X-Next-Offset"] = str(part.next_offset)
    response.headers["X-Task-State"] = str(part.state)
    if part.state in LIVE_TASK_STATES:
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/<lease_id>/tasks/<task_id>/cancel", responses={200: TaskOut, 202: TaskOut})
def cancel_task(path: TaskPath) -> Any:
    """Cancel: a queued task ends now, a running one within seconds (202); an ended task
    is returned as it is (200)."""
    services = svc()
    task, live = services.tasks.cancel(services.session(), g.tenant.id, path.lease_id, path.task_id)
    return task_out(task).model_dump(mode="json"), 202 if live else 200
