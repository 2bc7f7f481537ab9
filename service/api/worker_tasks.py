"""The agent's task endpoints: poll, output, result (worker token; docs/tasks.md)."""

from __future__ import annotations

from typing import Any

from flask import g, request
from flask_openapi3 import APIBlueprint

from service.api import AGENT_TAG, BEARER, problems, svc
from service.auth import require_worker_token
from service.schemas import (
    ContainerSpec,
    LogAck,
    LogChunkQuery,
    PollAnswer,
    TaskAssignment,
    TaskFinish,
    TaskFinished,
    WorkerPath,
    WorkerPoll,
    WorkerTaskPath,
)
from service.tasks import Work

bp = APIBlueprint(
    "worker_tasks",
    __name__,
    url_prefix="/v1/workers",
    abp_tags=[AGENT_TAG],
    abp_security=BEARER,
    abp_responses=problems(401, 404, 409, 413, 422, 429, 503),
)
bp.before_request(require_worker_token)

MAX_LOG_CHUNK = 1 << 20


@bp.before_request
def _room_for_a_chunk() -> None:
    if request.endpoint == "worker_tasks.task_output":
        request.max_content_length = MAX_LOG_CHUNK


@bp.post("/<worker_id>/poll", responses={200: PollAnswer})
def poll(path: WorkerPath, body: WorkerPoll) -> Any:
    """The worker's next tasks and the ones to kill; waits up to ``wait_seconds`` for some."""
    services = svc()
    work = services.tasks.poll(services.session(), g.worker_id, body.running, body.wait_seconds)
    return _answer(work).model_dump(mode="json")


def _answer(work: Work) -> PollAnswer:
    return PollAnswer(
        tasks=[
            TaskAssignment(
                id=task.id,
                script=payload.get("script", ""),
                shell=task.shell,  # type: ignore[arg-type]
                timeout_s=task.timeout_s,
                env=payload.get("env", {}),
                files=payload.get("files", {}),
                container=ContainerSpec(image=task.container_image)
                if task.container_image
                else None,
            )
            for task, payload in work.tasks
        ],
        cancel=work.cancel,
    )


@bp.post(
    "/<worker_id>/tasks/<task_id>/log",
    responses={200: LogAck},
    openapi_extensions={
        "requestBody": {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            }
        }
    },
)
def task_output(path: WorkerTaskPath, query: LogChunkQuery) -> Any:
    """Output from byte ``offset`` of the task's stream; repeats are stored once."""
    services = svc()
    receipt = services.tasks.append_log(
        services.session(), g.worker_id, path.task_id, query.offset, request.get_data()
    )
    return LogAck(
        received=receipt.received, cancel=receipt.cancel, discard=receipt.discard
    ).model_dump()


@bp.post("/<worker_id>/tasks/<task_id>/finish", responses={200: TaskFinished})
def finish_task(path: WorkerTaskPath, body: TaskFinish) -> Any:
    """The task's result; 409 with ``received`` while output is missing."""
    services = svc()
    task = services.tasks.finish(
        services.session(),
        g.worker_id,
        path.task_id,
        body.outcome,
        body.exit_code,
        body.error,
        body.log_bytes,
    )
    return TaskFinished(state=task.state).model_dump()  # type: ignore[arg-type]
