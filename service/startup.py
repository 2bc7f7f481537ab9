"""What ``serve``, ``scheduler`` and ``db upgrade`` do before anything else."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from service import crypto, migrate
from service.clock import SystemClock
from service.config import Config
from service.db import lock_job, make_engine, session_factory, session_scope
from service.pools import apply_config


def prepare_database(config: Config, engine: Engine | None = None) -> Engine:
    """Upgrade the schema and apply the pools of the config; return the engine."""
    crypto.configure(config.encryption_key)
    engine = engine or make_engine(config.database_url, config.database_pool_size)
    migrate.upgrade(engine)
    with session_scope(session_factory(engine)) as session:
        lock_job(session, "apply-config")
        apply_config(session, config.pools, SystemClock().now())
    return engine


def service_url(config: Config, host: str, port: int) -> str:
    """Where agents call back: ``public_url``, else the address the server listens on."""
    if config.public_url:
        return config.public_url.rstrip("/")
    reachable = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{reachable}:{port}"
