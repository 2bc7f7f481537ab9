"""Reconciliation removes this deployment's unknown resources and nothing else."""

from __future__ import annotations

from provisioners import WorkerSpec
from service.db import session_scope
from service.models import Pool, WorkerState
from service.passes.provisioning import handle_of
from service.pools import plan_refill
from service.workers import claim_creates, destroy_by_operator
from tests.api.helpers import POOL
from tests.conftest import Service
from tests.support.fakes import FakeResource


def _plant(svc: Service, worker_id: str, deployment_id: str, installation: str = "") -> None:
    """A resource the platform holds, as a crashed service (or another one) left it."""
    spec = WorkerSpec(
        worker_id=worker_id,
        pool=POOL,
        os="ubuntu",
        deployment_id=deployment_id,
        service_url="http://127.0.0.1:9",
        bootstrap_token="wlb_left-behind",
        installation_id=installation,
    )
    svc.cloud.resources[worker_id] = FakeResource(spec)


def test_reconcile_destroys_resources_of_this_deployment_the_database_does_not_know(
    svc: Service,
) -> None:
    svc.warm()
    known = {w.id for w in svc.workers("ready")}
    _plant(svc, "w-0000000000000000dead", "test")
    _plant(svc, "w-00000000000000000ther", "another-deployment")

    svc.reconcile()

    assert ("destroy", "w-0000000000000000dead") in svc.cloud.calls
    assert "w-0000000000000000dead" not in svc.cloud.live_ids()
    assert svc.cloud.live_ids("another-deployment") == {"w-00000000000000000ther"}
    assert ("destroy", "w-00000000000000000ther") not in svc.cloud.calls
    assert svc.cloud.live_ids("test") == known
    assert {w.id for w in svc.workers("ready")} == known


def test_reconcile_destroys_a_resource_whose_worker_row_is_already_destroyed(svc: Service) -> None:
    svc.warm()
    worker_id = svc.workers("ready")[0].id
    with session_scope(svc.rt.factory) as session:
        destroy_by_operator(session, worker_id, svc.clock.now())
    svc.tick()
    assert [w.state for w in svc.workers() if w.id == worker_id] == [WorkerState.DESTROYED]
    svc.cloud.resources[worker_id].destroyed = False  # the platform kept it after all

    svc.reconcile()

    assert worker_id not in svc.cloud.live_ids()
    assert svc.cloud.calls.count(("destroy", worker_id)) == 2


def test_reconcile_leaves_a_worker_whose_create_is_in_flight(svc: Service) -> None:
    """The row is committed before create; the resource exists before its result is recorded."""
    with session_scope(svc.rt.factory) as session:
        plan_refill(session, svc.clock.now())
    with session_scope(svc.rt.factory) as session:
        claimed = claim_creates(session, POOL, svc.clock.now(), limit=10)
        pool = session.get(Pool, POOL)
        assert pool is not None
    assert len(claimed) == 2
    provisioner = svc.rt.provisioners.for_pool(pool)
    for worker in claimed:  # the platform has made it; the service has not heard back
        provisioner.create(
            WorkerSpec(
                worker_id=worker.id,
                pool=POOL,
                os="ubuntu",
                deployment_id="test",
                service_url="http://127.0.0.1:9",
                bootstrap_token=worker.bootstrap_token or "",
            )
        )
        assert handle_of(worker).provider_id == ""

    svc.reconcile()

    assert svc.cloud.live_ids() == {w.id for w in claimed}
    assert not [call for call in svc.cloud.calls if call[0] == "destroy"]
    assert {w.id for w in svc.workers("provisioning")} == {w.id for w in claimed}


def test_reconcile_leaves_resources_another_database_made_under_the_same_deployment_id(
    svc: Service,
) -> None:
    """Two services sharing a deployment_id by mistake must not destroy each other's workers."""
    svc.warm()
    ours = svc.rt.provisioners.deployment.installation_id
    assert ours.startswith("i-")
    assert all(r.spec.installation_id == ours for r in svc.cloud.live().values())
    _plant(svc, "w-00000000000000other0", "test", installation="i-another-database")
    _plant(svc, "w-0000000000000000mine", "test", installation=ours)

    svc.reconcile()

    assert "w-00000000000000other0" in svc.cloud.live_ids()
    assert ("destroy", "w-00000000000000other0") not in svc.cloud.calls
    assert "w-0000000000000000mine" not in svc.cloud.live_ids()
    metrics = svc.client.get("/metrics").get_data(as_text=True)
    assert 'workerlease_foreign_resources{provisioner="fake"} 1.0' in metrics
