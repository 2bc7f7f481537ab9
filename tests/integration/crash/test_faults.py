"""Faults: the provisioner failing or hanging on create and destroy.

The service runs in this process (tests/support/live.py) with its real
scheduler (1 s interval) and a provisioner double (``doubles.py``) that can
hang a call until the test unblocks it, or fail it. While a provisioner call
hangs or fails, the service keeps serving what it can: leases from ready
workers are answered while the hang is still on, the other pool refills and
destroys as usual, and the same pool's other workers are created and destroyed.
Afterwards everything converges: pools back at ``min_ready``, nothing left in
``destroying``, and the double's resources are exactly the workers the database
holds live.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from service.db import session_scope
from service.models import Worker
from service.scheduler import run_scheduler
from tests.integration.crash.doubles import Control, install
from tests.support.live import LiveService, live_service
from tests.support.server import wait_until

pytestmark = pytest.mark.integration

MIN_READY = 2
# Not a speed target: a request queued behind the hang would wait for unblock() (or
# HANG_MAX_S, 300 s), so only that breaks this bound, never a slow machine. The proof
# that a request did not wait for the hang is that the hang is still on when it returns.
FAST_S = 15.0
WAIT_S = 60.0  # bounds a hang of the service's passes only


def _pool(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "os": "ubuntu",
        "provisioner": "faulty",
        "min_ready": MIN_READY,
        "max_workers": 6,
        "provision_timeout": "60s",
        "lease_idle_timeout": "60m",
    }


@pytest.fixture
def control() -> Iterator[Control]:
    control = install()
    yield control
    control.unblock()


@pytest.fixture
def live(tmp_path: Path, control: Control) -> Iterator[LiveService]:
    with live_service(
        f"sqlite:///{tmp_path / 'faults.db'}",
        [_pool("alpha"), _pool("beta")],
        f"faults-{uuid.uuid4().hex[:8]}",
        scheduler={"interval": "1s", "reconcile_interval": "2s"},
    ) as live:
        scheduler = run_scheduler(live.rt)
        try:
            yield live
        finally:
            control.unblock()
            scheduler.shutdown(wait=True)
            live.rt.creates.shutdown(10)
            live.rt.destroys.shutdown(10)


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def _lease(live: LiveService, token: str, pool: str) -> dict[str, Any]:
    response, took = _timed(lambda: live.call("POST", "/v1/leases", token, json={"pool": pool}))
    assert response.status_code == 201, response.text
    assert took < FAST_S, f"lease took {took:.2f}s"
    body: dict[str, Any] = response.json()
    return body


def _release(live: LiveService, token: str, lease: dict[str, Any]) -> None:
    response, took = _timed(lambda: live.call("DELETE", f"/v1/leases/{lease['id']}", token))
    assert response.status_code == 200, response.text
    assert took < FAST_S, f"release took {took:.2f}s"


def _rows(live: LiveService) -> dict[str, tuple[str, str]]:
    with session_scope(live.rt.factory) as session:
        return {w.id: (w.pool, w.state) for w in session.exec(select(Worker)).all()}


def _state_of(live: LiveService, worker_id: str) -> str:
    return _rows(live)[worker_id][1]


def _warm(live: LiveService) -> None:
    for pool in ("alpha", "beta"):
        wait_until(
            lambda p=pool: live.pool_counts(p)["ready"] == MIN_READY,
            WAIT_S,
            message=lambda p=pool: f"{p} never warm: {live.pool_counts(p)}",
        )


def _converged(live: LiveService, control: Control, deployment_id: str) -> None:
    """Pools at min_ready, nothing in flight, the double's resources = the live rows."""

    def done() -> bool:
        rows = _rows(live)
        live_rows = {w for w, (_, s) in rows.items() if s in ("provisioning", "ready", "leased")}
        unfinished = [s for _, s in rows.values() if s in ("provisioning", "destroying", "failed")]
        ready = {
            p: sum(1 for pool, s in rows.values() if pool == p and s == "ready")
            for p in ("alpha", "beta")
        }
        return (
            not unfinished
            and live_rows == control.live_ids(deployment_id)
            and all(n == MIN_READY for n in ready.values())
        )

    wait_until(
        done,
        2 * WAIT_S,
        interval=0.3,
        message=lambda: (
            f"not converged: rows={_rows(live)} resources={control.live_ids(deployment_id)}"
        ),
    )


def _deployment(live: LiveService) -> str:
    return live.rt.provisioners.deployment.deployment_id


def test_hanging_create_blocks_neither_leases_nor_other_work(
    live: LiveService, control: Control
) -> None:
    _warm(live)
    tokens = [live.tenant_token(f"t{i}") for i in range(3)]
    control.hang("create", "alpha")
    first = _lease(live, tokens[0], "alpha")  # the refill that follows hangs
    wait_until(
        lambda: "create" in control.hanging.values(), WAIT_S, message="the create never started"
    )
    hung = next(iter(control.hanging))

    # While it hangs: leases answer, from the ready workers of both pools.
    second = _lease(live, tokens[1], "alpha")
    other = _lease(live, tokens[2], "beta")
    response, took = _timed(lambda: live.call("GET", "/v1/admin/pools"))
    assert response.status_code == 200 and took < FAST_S
    assert control.hanging == {hung: "create"}, "answered only after the hang ended"

    # The destroy pass and the other pool's refill go on.
    _release(live, tokens[0], first)
    _release(live, tokens[2], other)
    for lease in (first, other):
        wait_until(
            lambda w=lease["worker"]["id"]: _state_of(live, w) == "destroyed",
            WAIT_S,
            message=lambda: f"destroy held up by a hanging create: {_rows(live)}",
        )
    wait_until(
        lambda: live.pool_counts("beta")["ready"] == MIN_READY,
        WAIT_S,
        message=lambda: f"beta refill held up: {live.pool_counts('beta')}",
    )
    # The same pool's other creates too: alpha has a ready worker besides the hung one.
    wait_until(
        lambda: live.pool_counts("alpha")["ready"] >= 1,
        WAIT_S,
        message=lambda: f"alpha's other creates held up: {live.pool_counts('alpha')}",
    )
    assert control.hanging == {hung: "create"}, "the hang ended early"

    control.unblock()
    _release(live, tokens[1], second)
    _converged(live, control, _deployment(live))


def test_hanging_destroy_blocks_neither_leases_nor_other_destroys(
    live: LiveService, control: Control
) -> None:
    _warm(live)
    tokens = [live.tenant_token(f"t{i}") for i in range(3)]
    control.hang("destroy", "alpha")
    first = _lease(live, tokens[0], "alpha")
    second = _lease(live, tokens[1], "alpha")
    _release(live, tokens[0], first)
    wait_until(
        lambda: "destroy" in control.hanging.values(),
        WAIT_S,
        message="the destroy never started",
    )
    assert control.hanging == {first["worker"]["id"]: "destroy"}

    # While it hangs: leases answer, and the other pool destroys as usual.
    other = _lease(live, tokens[2], "beta")
    _release(live, tokens[2], other)
    wait_until(
        lambda: _state_of(live, other["worker"]["id"]) == "destroyed",
        WAIT_S,
        message=lambda: f"beta destroy held up by alpha's hang: {_rows(live)}",
    )
    wait_until(
        lambda: live.pool_counts("alpha")["ready"] >= 1,
        WAIT_S,
        message=lambda: f"alpha refill held up: {live.pool_counts('alpha')}",
    )

    # The same pool's next released worker is destroyed too, not queued behind the hang.
    _release(live, tokens[1], second)
    wait_until(
        lambda: _state_of(live, second["worker"]["id"]) == "destroyed",
        WAIT_S,
        message=lambda: (
            f"alpha destroy of {second['worker']['id']} queued behind the "
            f"hanging destroy of {first['worker']['id']}: {_rows(live)}"
        ),
    )

    assert control.hanging == {first["worker"]["id"]: "destroy"}, "the hang ended early"

    control.unblock()
    _converged(live, control, _deployment(live))


def test_failing_create_and_destroy_are_retried_and_converge(
    live: LiveService, control: Control
) -> None:
    _warm(live)
    tokens = [live.tenant_token(f"t{i}") for i in range(2)]
    control.fail("create", "alpha", 1)
    control.fail("destroy", "alpha", 2)
    first = _lease(live, tokens[0], "alpha")
    _release(live, tokens[0], first)
    # A failed create backs the pool off; ready workers are still leased meanwhile.
    wait_until(
        lambda: control.failures[("create", "alpha")] == 0,
        WAIT_S,
        message="the create never failed",
    )
    second = _lease(live, tokens[1], "alpha")
    other = _lease(live, tokens[0], "beta")
    _release(live, tokens[1], second)
    _release(live, tokens[0], other)
    wait_until(
        lambda: (
            _state_of(live, first["worker"]["id"]) == "destroyed"
            and _state_of(live, second["worker"]["id"]) == "destroyed"
        ),
        2 * WAIT_S,
        message=lambda: f"failed destroys never retried: {_rows(live)}",
    )
    _converged(live, control, _deployment(live))
    failed_creates = [
        w
        for w, (p, s) in _rows(live).items()
        if p == "alpha"
        and s == "destroyed"
        and w not in control.destroyed
        and w not in (first["worker"]["id"], second["worker"]["id"])
    ]
    assert failed_creates, "the failed create left no row behind"
