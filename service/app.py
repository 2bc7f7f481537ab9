"""The Flask application factory."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from flask_openapi3 import Info, OpenAPI
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from service import __version__, crypto, openapi
from service.api.errors import register_error_handlers, validation_problem
from service.auth import BODY_IN_MEMORY
from service.clock import Clock, SystemClock
from service.config import Config
from service.db import WEB_CHECKPOINT_PAGES, make_engine, session_factory, transaction
from service.doorbell import bell_for
from service.lease_flow import LeaseFlow
from service.logs import RequestIds
from service.metrics import observe_request
from service.task_flow import TaskFlow
from service.wakes import Relay, relay_for

log = logging.getLogger("workerlease.app")

MAX_BODY_BYTES = 64 * 1024


class BoundedJSON(DefaultJSONProvider):
    """JSON that turns too deep a nesting into a parse error (a 4xx), never a 500.

    The decoder recurses per level; ``{"a":`` repeated a thousand times raised
    RecursionError, which the request parser does not treat as bad JSON.
    """

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return super().loads(s, **kwargs)
        except RecursionError as exc:
            raise ValueError("JSON nested too deeply") from exc


@dataclass
class Services:
    """What views need, bound to the app (``current_app.extensions["workerlease"]``)."""

    config: Config
    engine: Engine
    factory: sessionmaker[Session]
    read_factory: sessionmaker[Session]
    clock: Clock
    flow: LeaseFlow
    tasks: TaskFlow
    relay: Relay

    def close(self) -> None:
        """What the app keeps beyond requests (the wakes relay's threads and connections,
        the doorbell's sender): for an app that ends before its process does (tests)."""
        self.relay.close()
        self.flow.bell.close()

    def session(self) -> Session:
        """The request's one session, closed in teardown (read-only for GET requests)."""
        if "db_session" not in g:
            reading = request.method in ("GET", "HEAD")
            g.db_session = (self.read_factory if reading else self.factory)()
        session: Session = g.db_session
        return session

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One transaction on the request's session."""
        with transaction(self.session()) as session:
            yield session


def create_app(
    config: Config, *, engine: Engine | None = None, clock: Clock | None = None
) -> Flask:
    admin_token = config.require_admin_token()
    crypto.configure(config.encryption_key)
    app = OpenAPI(
        __name__,
        info=Info(
            title="workerlease",
            version=__version__,
            description="Lease warm-pool worker machines to tenants.",
        ),
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}},
        validation_error_status=422,
        validation_error_callback=validation_problem,
        doc_prefix="/docs",
        doc_url="/openapi.json",
    )
    app.config.update(
        ADMIN_TOKEN=admin_token, MAX_CONTENT_LENGTH=MAX_BODY_BYTES, JSON_SORT_KEYS=False
    )
    app.json = BoundedJSON(app)
    engine = engine or make_engine(
        config.database_url, config.database_pool_size, wal_autocheckpoint=WEB_CHECKPOINT_PAGES
    )
    clock = clock or SystemClock()
    read_factory = session_factory(engine, read_only=True)
    relay = relay_for(engine)
    services = Services(
        config=config,
        engine=engine,
        factory=session_factory(engine),
        read_factory=read_factory,
        clock=clock,
        flow=LeaseFlow(
            read_factory,
            clock,
            bell_for(engine, config.scheduler.doorbell),
            max_waits_per_tenant=config.max_waits_per_tenant,
            relay=relay,
        ),
        tasks=TaskFlow(
            read_factory,
            clock,
            log_limit=config.task_log_limit,
            max_waits_per_tenant=config.max_waits_per_tenant,
            relay=relay,
        ),
        relay=relay,
    )
    app.extensions["workerlease"] = services

    @app.teardown_appcontext
    def _close_session(_exc: BaseException | None) -> None:
        session = g.pop("db_session", None)
        if session is not None:
            session.close()

    _count_requests(app)
    _read_small_bodies_first(app)
    register_error_handlers(app)
    app.wsgi_app = RequestIds(app.wsgi_app)  # type: ignore[method-assign]
    _register_blueprints(app)
    openapi.install(app, config.public_url)
    _register_openapi_alias(app)
    return app


def _count_requests(app: Flask) -> None:
    """``workerlease_http_requests_total`` / ``_duration_seconds`` by route template."""

    @app.before_request
    def _start_clock() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        started = g.get("request_started")
        if started is not None:  # None: it failed before the first before_request ran
            rule = request.url_rule.rule if request.url_rule is not None else None
            observe_request(
                rule, request.method, response.status_code, time.perf_counter() - started
            )
        return response


def _read_small_bodies_first(app: Flask) -> None:
    """A body within the app's limit is read before authentication opens a transaction.

    Authentication runs first and, for most requests, in the request's own write
    transaction; had the body not arrived yet (a client that sends it in a second
    packet, or slowly), that transaction would wait on the network holding SQLite's one
    write lock. Only bodies within ``MAX_BODY_BYTES`` are read this early: the few
    endpoints allowed more (a task, a chunk of output) read theirs after authentication,
    which then looks the token up on a read connection (``service.auth``).
    """

    @app.before_request
    def _body_into_memory() -> None:
        length = request.content_length
        if length is None:  # no body, or a chunked one (its length is known only at its end)
            chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
            g.setdefault(BODY_IN_MEMORY, not chunked)
        elif length <= MAX_BODY_BYTES:
            request.get_data(cache=True)
            g.setdefault(BODY_IN_MEMORY, True)


def _register_blueprints(app: OpenAPI) -> None:
    from service import dashboard
    from service.api import admin, leases, ops, pools, tasks, worker_tasks, workers

    app.register_api(leases.bp)
    app.register_api(tasks.bp)
    app.register_api(worker_tasks.bp)
    app.register_api(pools.bp)
    app.register_api(workers.bp)
    app.register_api(admin.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(dashboard.bp)


def _register_openapi_alias(app: OpenAPI) -> None:
    """The document at the well-known ``/openapi.json`` too (generated once, then cached)."""
    cache: dict[str, Any] = {}

    @app.get("/openapi.json", doc_ui=False)
    def openapi_json() -> Any:
        if "doc" not in cache:
            cache["doc"] = app.api_doc
        return jsonify(cache["doc"])
