"""Bearer authentication for tenants and operators.

Blueprints call :func:`require_tenant` / :func:`require_admin` /
:func:`require_bootstrap_token` / :func:`require_worker_token` from ``before_request``
so authentication happens before body validation: an unauthenticated caller learns
nothing about the request shape, nor which worker ids exist.

A token is looked up in the request's own transaction only once its body is in memory
(``app._body_into_memory`` reads the small ones first). A larger body (a task, a chunk
of output) arrives after authentication, so its lookup runs on a read connection of
its own: a write transaction that waited on the network for the body would hold, on
SQLite, the database's one write lock all that time, and every other writer with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flask import current_app, g, request
from sqlalchemy import Table, bindparam, select
from sqlalchemy.engine import Connection

from service import workers
from service.db import read_scope
from service.driver_sql import DriverStatement
from service.errors import Forbidden, Unauthorized
from service.models import Tenant
from service.security import TENANT_TOKEN_PREFIX, hash_token, secret_equals

# On the driver, not the ORM: every tenant request runs it (views read ``g.tenant.id``
# and ``.enabled``, never write the row).
_TENANTS: Table = Tenant.__table__  # type: ignore[attr-defined]
_TENANT_BY_TOKEN_HASH = DriverStatement(
    select(_TENANTS.c.id, _TENANTS.c.name, _TENANTS.c.enabled).where(
        _TENANTS.c.token_hash == bindparam("token_hash")
    )
)


def bearer_token() -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    return token.strip()


BODY_IN_MEMORY = "body_in_memory"  # ``g`` flag, set by ``app._body_into_memory``


@contextmanager
def _lookup_connection() -> Iterator[Connection]:
    """Where a token is looked up: the request's own transaction, unless that would begin
    a write transaction before the body has arrived (see the module docstring)."""
    services = current_app.extensions["workerlease"]
    if request.method in ("GET", "HEAD") or g.get(BODY_IN_MEMORY):
        yield services.session().connection()
    else:
        with read_scope(services.read_factory) as connection:
            yield connection


def _is_admin(token: str) -> bool:
    return secret_equals(token, current_app.config["ADMIN_TOKEN"])


def require_tenant() -> None:
    token = bearer_token()
    if _is_admin(token):
        raise Forbidden("the admin token cannot act as a tenant; use a tenant token")
    tenant = None
    if token.startswith(TENANT_TOKEN_PREFIX):
        # Lookup by the hash's unique index; the hash itself is never compared byte-wise
        # against user input, so timing reveals nothing about stored tokens.
        with _lookup_connection() as connection:
            tenant = _TENANT_BY_TOKEN_HASH.first(connection, {"token_hash": hash_token(token)})
    if tenant is None or not tenant.enabled:
        raise Unauthorized("unknown or revoked token")
    g.tenant = tenant


def require_admin() -> None:
    token = bearer_token()
    if _is_admin(token):
        return
    require_tenant()  # a valid tenant token is 403, anything else 401
    raise Forbidden("this endpoint needs the admin token")


def require_bootstrap_token() -> None:
    """The agent's one-time token for the worker in the path, checked before the body."""
    token = bearer_token()
    worker_id = (request.view_args or {}).get("worker_id", "")
    session = current_app.extensions["workerlease"].session()
    workers.check_bootstrap_token(session, str(worker_id), token)


def require_worker_token() -> None:
    """The agent's worker token for the worker in the path, checked before the body.

    The long poll checks it on a read connection of its own (it must not hold a write
    transaction while it waits); results, and output chunks small enough to be in
    memory already, check it in the request's own transaction, which their write then
    continues (one session, not two)."""
    token = bearer_token()
    worker_id = str((request.view_args or {}).get("worker_id", ""))
    services = current_app.extensions["workerlease"]
    if request.endpoint == "worker_tasks.poll":
        services.tasks.authenticate_worker(worker_id, token)
    else:
        with _lookup_connection() as connection:
            workers.check_worker_token(connection, worker_id, token)
    g.worker_id = worker_id


def require_metrics_token() -> None:
    """``/metrics`` is open unless ``metrics_token`` is set; then only its bearer may read."""
    expected = current_app.extensions["workerlease"].config.metrics_token
    if expected is not None and not secret_equals(bearer_token(), expected):
        raise Unauthorized("this endpoint needs the metrics token")
