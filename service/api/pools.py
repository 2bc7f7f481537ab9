"""Pools a tenant can lease from: ``/v1/pools``."""

from __future__ import annotations

from typing import Any

from flask_openapi3 import APIBlueprint

from service import listing
from service.api import BEARER, TENANT_TAG, problems, svc
from service.auth import require_tenant
from service.models import Pool
from service.schemas import PoolList, PoolOut

bp = APIBlueprint(
    "pools",
    __name__,
    url_prefix="/v1/pools",
    abp_tags=[TENANT_TAG],
    abp_security=BEARER,
    abp_responses=problems(401, 403, 503),
)
bp.before_request(require_tenant)


@bp.get("", responses={200: PoolList})
def list_pools() -> Any:
    """Enabled pools."""
    pools = listing.enabled_pools(svc().session())
    return PoolList(pools=[pool_out(p) for p in pools]).model_dump(mode="json")


def pool_out(pool: Pool) -> PoolOut:
    return PoolOut(
        name=pool.name,
        os=pool.os,
        description=pool.description,
        capabilities=pool.capabilities,
        lease_idle_timeout_s=pool.lease_idle_timeout_s,
        lease_max_lifetime_s=pool.lease_max_lifetime_s,
    )
