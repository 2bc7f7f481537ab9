"""Reconcile: destroy every resource of this deployment that the database does not hold live."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from provisioners import Provisioner, WorkerHandle
from service import metrics
from service.db import session_scope
from service.passes.provisioning import failure_of
from service.passes.runtime import Runtime
from service.workers import live_worker_ids

log = logging.getLogger("workerlease.passes.reconcile")


def reconcile(rt: Runtime, now: datetime | None = None) -> int:
    """Destroy orphans; return how many were destroyed.

    The listing is taken before the database is read: a worker row is always
    committed before its resource is created, so anything listed that has no
    live row is an orphan (left by a crash, or by a deleted database).
    """
    orphans = 0
    deployment = rt.provisioners.deployment
    for provisioner in rt.provisioners.distinct(rt.pools()):
        try:
            listed = provisioner.list_owned(deployment.deployment_id)
        except Exception as exc:
            failure = failure_of(exc)
            metrics.PROVISIONER_ERRORS.labels(provisioner.pool, "list_owned", failure.kind).inc()
            log.warning("list_owned_failed provisioner=%s error=%s", provisioner.name, exc)
            continue
        owned = _ours(provisioner, listed, deployment.deployment_id, deployment.installation_id)
        if owned:
            with session_scope(rt.read_factory) as session:
                live = live_worker_ids(session)
            orphans += _destroy_orphans(provisioner, [h for h in owned if h.worker_id not in live])
    return orphans


def _ours(
    provisioner: Provisioner[Any], listed: list[WorkerHandle], deployment_id: str, installation: str
) -> list[WorkerHandle]:
    """The resources this database made (or, unlabelled, made before installation ids).

    Another database's resources under the same deployment id are never destroyed:
    that is another service (or a database that was lost) and an operator's call.
    """
    ours: list[WorkerHandle] = []
    foreign: list[WorkerHandle] = []
    for handle in listed:
        mine = handle.installation in (None, "", installation)
        (ours if mine else foreign).append(handle)
    metrics.FOREIGN_RESOURCES.labels(provisioner.name).set(len(foreign))
    if foreign:
        log.error(
            "foreign_resources_found provisioner=%s deployment=%s count=%d installations=%s "
            "workers=%s: another database uses this deployment_id; they are left alone. Give "
            "each service its own deployment_id; if that database is gone, remove them with "
            "the platform's tools (label/tag workerlease.installation)",
            provisioner.name,
            deployment_id,
            len(foreign),
            ",".join(sorted({str(h.installation) for h in foreign})),
            ",".join(h.worker_id for h in foreign[:20]),
        )
    return ours


def _destroy_orphans(provisioner: Provisioner[Any], unknown: list[WorkerHandle]) -> int:
    if not unknown:
        return 0
    log.warning(
        "orphans_found provisioner=%s count=%d workers=%s",
        provisioner.name,
        len(unknown),
        ",".join(h.worker_id for h in unknown[:20]),
    )
    destroyed = 0
    for worker_id, error in provisioner.destroy_many(unknown).items():
        if error is None:
            destroyed += 1
            continue
        failure = failure_of(error)
        metrics.PROVISIONER_ERRORS.labels(provisioner.pool, "destroy", failure.kind).inc()
        log.warning("orphan_destroy_failed worker=%s error=%s", worker_id, failure.detail)
    return destroyed
