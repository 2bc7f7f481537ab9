"""What ``serve``, ``scheduler`` and ``db upgrade`` do before anything else."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from sqlalchemy.engine import Engine, make_url

from service import crypto, migrate
from service.clock import SystemClock
from service.config import Config, load_config
from service.db import lock_job, make_engine, session_factory, session_scope
from service.passes.provisioning import check_pool_options
from service.pools import apply_config

log = logging.getLogger("workerlease.startup")


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


def sqlite_path(database_url: str) -> Path | None:
    """The database file of a SQLite URL (None for other databases and in-memory ones)."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def secure_database_files(database_url: str) -> None:
    """Make an existing SQLite database and its -wal/-shm private (made before umask 077)."""
    path = sqlite_path(database_url)
    if path is None:
        return
    for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            candidate.chmod(0o600)


def with_encryption_key(config: Config, *, make: bool) -> Config:
    """On SQLite without a configured key, the key of a 0600 file beside the database.

    The file is made on first start (``<database>.key``, ``make``), so worker tokens
    are encrypted at rest on SQLite too; PostgreSQL requires a configured key.
    """
    path = sqlite_path(config.database_url)
    if config.encryption_key or path is None:
        return config
    key_path = Path(f"{path}.key")
    if not make and not key_path.exists():
        return config
    try:
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key_path.chmod(0o600)
        key = key_path.read_text().strip()
    else:
        key = crypto.new_key()
        with os.fdopen(descriptor, "w") as file:
            file.write(key + "\n")
        log.info("encryption_key_created path=%s", key_path)
    return config.model_copy(update={"encryption_key": key})


def load(path: str | None, *, serving: bool = False) -> Config:
    """The config as a process of the service uses it: parsed, pool options checked,
    the SQLite key file read (made too when ``serving``), the database files private."""
    config = with_encryption_key(load_config(path), make=serving)
    check_pool_options(config)
    secure_database_files(config.database_url)
    return config
