"""The worker agent's callback: ``POST /v1/workers/<id>/ready`` (bootstrap token)."""

from __future__ import annotations

from typing import Any

from flask_openapi3 import APIBlueprint

from service.api import AGENT_TAG, BEARER, problems, svc
from service.auth import bearer_token, require_bootstrap_token
from service.schemas import ReadyAck, WorkerPath, WorkerReady

bp = APIBlueprint(
    "workers",
    __name__,
    url_prefix="/v1/workers",
    abp_tags=[AGENT_TAG],
    abp_security=BEARER,
    abp_responses=problems(401, 409, 413, 422, 503),
)
bp.before_request(require_bootstrap_token)


@bp.post("/<worker_id>/ready", responses={200: ReadyAck})
def ready(path: WorkerPath, body: WorkerReady) -> Any:
    """The agent is up: the worker becomes ready and receives its access and worker tokens."""
    services = svc()
    ready = services.flow.worker_ready(
        services.session(), path.worker_id, bearer_token(), body.agent_url, body.address
    )
    return ReadyAck(access_token=ready.access_token, worker_token=ready.worker_token).model_dump()
