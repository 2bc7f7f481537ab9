"""Starting the service's parts in the right order, shared by ``serve`` and ``scheduler``."""

from __future__ import annotations

import logging
import os
import socket
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.engine import Engine
from sqlmodel import Session

from service import crypto, migrate
from service.clock import Clock, SystemClock
from service.config import Config
from service.db import lock_job, make_engine, session_factory, session_scope
from service.doorbell import bell_for
from service.jobs import Runtime, start_scheduler
from service.models import Heartbeat
from service.pools import apply_config
from service.provisioning import Deployment, ProvisionerSet
from service.workers import release_claims

log = logging.getLogger("workerlease.runtime")

HEARTBEAT = "scheduler"


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
    if config.public_url:
        return config.public_url.rstrip("/")
    reachable = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{reachable}:{port}"


def build_runtime(config: Config, engine: Engine, url: str, clock: Clock | None = None) -> Runtime:
    deployment = Deployment(deployment_id=config.deployment_id, service_url=url)
    return Runtime(
        factory=session_factory(engine),
        provisioners=ProvisionerSet(deployment),
        clock=clock or SystemClock(),
        settings=config.scheduler,
        bell=bell_for(engine),
    )


def run_scheduler(rt: Runtime) -> BackgroundScheduler:
    with session_scope(rt.factory) as session:
        released = release_claims(session)
    if released:
        log.info("claims_released count=%d (left by a scheduler that stopped)", released)
    scheduler = start_scheduler(rt)
    scheduler.add_job(
        beat,
        "interval",
        args=[rt],
        seconds=rt.settings.interval,
        id="heartbeat",
        next_run_time=datetime.now().astimezone(),
    )
    return scheduler


def beat(rt: Runtime) -> None:
    try:
        with session_scope(rt.factory) as session:
            _write_heartbeat(session, rt.clock.now())
    except Exception:
        log.warning("heartbeat_failed", exc_info=True)


def _write_heartbeat(session: Session, now: datetime) -> None:
    row = session.get(Heartbeat, HEARTBEAT) or Heartbeat(name=HEARTBEAT)
    row.at = now
    row.detail = f"{socket.gethostname()}:{os.getpid()}"
    session.add(row)
