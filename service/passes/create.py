"""Refill: plan the workers the pools lack, then create them in the background."""

from __future__ import annotations

import logging
from datetime import datetime

from sqlmodel import Session

from provisioners import WorkerSpec
from service.db import session_scope
from service.passes.provisioning import failure_of
from service.passes.runtime import Runtime
from service.pools import PoolView, plan_refill, pools_by_name
from service.workers import ClaimedWorker, claim_creates, record_create, record_create_failure

log = logging.getLogger("workerlease.passes.create")


def refill(rt: Runtime, now: datetime, wait: bool = True) -> None:
    """Commit rows for the workers the pools lack, then start creating them.

    Creates run in the background (``rt.creates``); ``wait`` waits for them, as tests
    and one-off calls want. The scheduler does not wait.
    """
    # Plan and claim in one transaction (the pools read there too): the rows are
    # committed, already claimed, before any provisioner is asked to create anything.
    with session_scope(rt.factory) as session:
        pools = pools_by_name(session)
        plan_refill(session, now, pools)
        claims = [(pool, _claim(rt, session, pool, now)) for pool in pools]
    for pool, claimed in claims:
        for worker in claimed:
            rt.creates.submit(pool.name, worker.id, create_one, rt, pool, worker, now)
    if wait:
        rt.creates.wait()


def _claim(rt: Runtime, session: Session, pool: PoolView, now: datetime) -> list[ClaimedWorker]:
    slots = rt.creates.free_slots(pool.name)
    if slots == 0:
        return []
    return claim_creates(session, pool.name, now, slots, skip=rt.creates.in_flight(pool.name))


def create_one(rt: Runtime, pool: PoolView, worker: ClaimedWorker, now: datetime) -> None:
    """Launch one claimed worker's resource and record the result."""
    spec = WorkerSpec(
        worker_id=worker.id,
        pool=pool.name,
        os=pool.os,
        deployment_id=rt.provisioners.deployment.deployment_id,
        service_url=rt.provisioners.deployment.service_url,
        bootstrap_token=worker.bootstrap_token or "",
        installation_id=rt.provisioners.deployment.installation_id,
        capabilities=tuple(pool.capabilities),
    )
    try:
        handle = rt.provisioners.for_pool(pool).create(spec)
    except Exception as exc:
        failure = failure_of(exc)
        log.warning(
            "worker_create_failed pool=%s worker=%s kind=%s error=%s",
            pool.name,
            worker.id,
            failure.kind,
            failure.detail,
            exc_info=failure.kind == "unexpected",
        )
        with session_scope(rt.factory) as session:
            record_create_failure(session, pool.name, worker.id, failure, now)
        return
    with session_scope(rt.factory) as session:
        record_create(session, pool.name, worker.id, handle.provider_id, handle.address, now)
    log.info(
        "worker_created pool=%s worker=%s provider_id=%s", pool.name, worker.id, handle.provider_id
    )
