"""A lease-and-task cycle through a client generated from the service's /openapi.json."""

import os

from workerlease_api import AuthenticatedClient
from workerlease_api.api.tenant import (
    cancel_task,
    create_lease,
    get_lease,
    list_leases,
    list_pools,
    release_lease,
    submit_task,
)
from workerlease_api.models import (
    EndReason,
    LeaseCreate,
    LeaseList,
    LeaseOut,
    LeaseState,
    ListLeasesState,
    PoolList,
    Problem,
    TaskCreate,
    TaskOut,
)


def main() -> None:
    client = AuthenticatedClient(base_url=os.environ["WL_URL"], token=os.environ["WL_TOKEN"])
    with client:
        pools = list_pools.sync(client=client)
        assert isinstance(pools, PoolList), pools
        assert "hosted-ubuntu" in [pool.name for pool in pools.pools]

        lease = create_lease.sync(
            client=client, body=LeaseCreate(pool="hosted-ubuntu", wait_seconds=60)
        )
        assert isinstance(lease, LeaseOut), lease
        assert lease.state == LeaseState.ACTIVE and lease.worker is not None

        task = submit_task.sync(
            lease_id=lease.id, client=client, body=TaskCreate(script="echo generated", timeout_s=60)
        )
        assert isinstance(task, TaskOut), task
        cancelled = cancel_task.sync(lease_id=lease.id, task_id=task.id, client=client)
        assert isinstance(cancelled, TaskOut) and cancelled.id == task.id, cancelled

        listed = list_leases.sync(client=client, state=ListLeasesState.ALL, limit=10)
        assert isinstance(listed, LeaseList), listed
        assert [item.id for item in listed.leases] == [lease.id]

        released = release_lease.sync(lease_id=lease.id, client=client)
        assert isinstance(released, LeaseOut), released
        assert released.end_reason == EndReason.RELEASED

        missing = get_lease.sync(lease_id="l-00000000000000000000", client=client)
        assert isinstance(missing, Problem) and missing.status == 404, missing
        refused = create_lease.sync_detailed(client=client, body=LeaseCreate(pool="Not A Pool"))
        assert refused.status_code == 422 and isinstance(refused.parsed, Problem), refused
        assert refused.parsed.errors and refused.parsed.errors[0].loc, refused.parsed
    print("cycle ok")


if __name__ == "__main__":
    main()
