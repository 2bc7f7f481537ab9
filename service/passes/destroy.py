"""Destroy: remove the resources of workers in ``destroying``, in the pool's batch size."""

from __future__ import annotations

from datetime import datetime

from service.db import session_scope
from service.passes.provisioning import failure_of, handle_of
from service.passes.runtime import Runtime
from service.pools import PoolView, pools_by_name
from service.workers import CallFailure, ClaimedWorker, claim_destroys, record_destroys


def destroy(rt: Runtime, now: datetime | None = None, wait: bool = True) -> None:
    """Claim each pool's due destroys and run them in batches the provisioner likes.

    Several batches of a pool run at once, so one hanging destroy holds up only itself.
    """
    now = now or rt.clock.now()
    claims = []
    with session_scope(rt.factory) as session:  # one transaction claims for every pool
        for pool in pools_by_name(session):
            slots = rt.destroys.free_slots(pool.name)
            if slots == 0:
                continue
            size = rt.provisioners.for_pool(pool).destroy_batch_size
            claims.append((pool, size, claim_destroys(session, pool.name, now, slots * size)))
    for pool, size, claimed in claims:
        for start in range(0, len(claimed), size):
            batch = claimed[start : start + size]
            rt.destroys.submit(pool.name, batch[0].id, destroy_batch, rt, pool, batch, now)
    if wait:
        rt.destroys.wait()


def destroy_batch(rt: Runtime, pool: PoolView, workers: list[ClaimedWorker], now: datetime) -> int:
    """Destroy one batch and record it; return how many the provisioner confirmed."""
    handles = [handle_of(w) for w in workers]
    results: dict[str, CallFailure | None]
    try:
        raw = rt.provisioners.for_pool(pool).destroy_many(handles)
        results = {wid: None if exc is None else failure_of(exc) for wid, exc in raw.items()}
    except Exception as exc:  # a provisioner bug is recorded and retried like any failure
        failure = failure_of(exc)
        results = {h.worker_id: failure for h in handles}
    with session_scope(rt.factory) as session:
        return record_destroys(session, pool.name, results, now)
