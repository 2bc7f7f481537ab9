"""Operations endpoints: liveness, readiness and Prometheus metrics (no auth, no OpenAPI)."""

from __future__ import annotations

import importlib.resources
from typing import Any

from flask import Blueprint, Response, abort, jsonify

from service import heartbeats, listing, metrics
from service.api import svc
from service.auth import require_metrics_token
from service.db import session_scope
from service.pools import warm_targets

bp = Blueprint("ops", __name__)


# What a worker's boot script fetches (provisioners/userdata.py), pinned there by sha256:
# the agent of the very version of this service, and its installers. Public code, no
# secret: no authentication, as the worker has no credential before its callback.
AGENT_FILES = frozenset({"workerlease_agent.py", "install.sh", "install.ps1"})


@bp.get("/v1/agent/<name>")
def agent_file(name: str) -> Any:
    if name not in AGENT_FILES:
        abort(404)
    data = importlib.resources.files("images.agent").joinpath(name).read_bytes()
    return Response(data, mimetype="text/plain", headers={"Cache-Control": "no-cache"})


@bp.get("/healthz")
def healthz() -> Any:
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> Any:
    """Ready when the database answers and a scheduler (in any replica) beat recently."""
    services = svc()
    checks = {"database": "ok", "scheduler": "ok"}
    try:
        with session_scope(services.read_factory) as session:
            beat = heartbeats.last_beat(session, heartbeats.SCHEDULER)
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
        checks["scheduler"] = "unknown"
    else:
        stale_after = max(3 * services.config.scheduler.interval, 15)
        if beat is None:
            checks["scheduler"] = "no heartbeat yet"
        elif (services.clock.now() - beat.at).total_seconds() > stale_after:
            checks["scheduler"] = f"last heartbeat {beat.at.isoformat()} ({beat.detail})"
    ok = all(value == "ok" for value in checks.values())
    response = jsonify(status="ready" if ok else "unavailable", checks=checks)
    response.status_code = 200 if ok else 503
    return response


@bp.get("/metrics")
def prometheus() -> Response:
    require_metrics_token()
    body, content_type = metrics.render(_snapshot)
    return Response(body, content_type=content_type)


def _snapshot() -> dict[str, list[tuple[dict[str, str], float]]]:
    with session_scope(svc().read_factory) as session:
        fleet = listing.fleet_counts(session)
        targets = warm_targets(session, fleet.pools, svc().clock.now())
    return {
        "workerlease_workers": [({"pool": p, "state": s}, n) for p, s, n in fleet.workers],
        "workerlease_leases": [({"pool": p, "state": s}, n) for p, s, n in fleet.leases],
        "workerlease_pool_degraded": [
            ({"pool": p.name}, 1.0 if p.degraded_reason or p.destroy_error else 0.0)
            for p in fleet.pools
        ],
        "workerlease_pool_min_ready": [({"pool": p.name}, p.min_ready) for p in fleet.pools],
        **metrics.warm_samples(targets),
    }
