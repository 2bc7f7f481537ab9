"""Worker tokens are encrypted at rest; PostgreSQL refuses to run without a key."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml
from sqlalchemy import text

from service import crypto, startup
from service.config import ConfigError, config_from_dict
from service.security import make_files_private
from tests.conftest import ADMIN_TOKEN, Service


def test_access_and_bootstrap_tokens_are_stored_encrypted(svc: Service) -> None:
    svc.tick()
    worker = svc.workers("provisioning")[0]
    with svc.engine.connect() as connection:
        stored = connection.execute(
            text("SELECT access_token, bootstrap_token FROM workers WHERE id = :id"),
            {"id": worker.id},
        ).one()
    assert worker.access_token.startswith("wla_")
    assert stored.access_token.startswith(crypto.PREFIX)
    assert worker.access_token not in stored.access_token
    assert stored.bootstrap_token.startswith(crypto.PREFIX)


def test_rotated_keys_still_decrypt_old_values() -> None:
    old, new = crypto.new_key(), crypto.new_key()
    try:
        crypto.configure(old)
        stored = crypto.encrypt("wla_secret")
        crypto.configure(f"{new},{old}")
        assert crypto.decrypt(stored) == "wla_secret"
        crypto.configure(new)
        with pytest.raises(crypto.SecretDecryptError):
            crypto.decrypt(stored)
    finally:
        crypto.configure(None)


def test_postgresql_without_encryption_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="encryption_key"):
        config_from_dict(
            {"database_url": "postgresql+psycopg://u@127.0.0.1/db", "admin_token": ADMIN_TOKEN}
        )


def test_malformed_encryption_key_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="encryption_key"):
        config_from_dict({"admin_token": ADMIN_TOKEN, "encryption_key": "not-a-key"})


def _write_config(tmp_path: Path, database: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump({"database_url": f"sqlite:///{database}", "admin_token": ADMIN_TOKEN})
    )
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_on_sqlite_without_a_key_serving_makes_a_private_key_file_once(tmp_path: Path) -> None:
    database = tmp_path / "wl.db"
    config_path = _write_config(tmp_path, database)
    old = os.umask(0o022)
    try:
        assert startup.load(str(config_path)).encryption_key is None  # reading makes nothing
        assert not Path(f"{database}.key").exists()
        first = startup.load(str(config_path), serving=True).encryption_key
        again = startup.load(str(config_path), serving=True).encryption_key
        reader = startup.load(str(config_path)).encryption_key
    finally:
        os.umask(old)
    key_file = Path(f"{database}.key")
    assert first and first == again == reader == key_file.read_text().strip()
    assert _mode(key_file) == 0o600
    crypto.validate_keys(first)


def test_the_database_and_its_wal_and_shm_are_private_whatever_the_umask(
    tmp_path: Path,
) -> None:
    database = tmp_path / "wl.db"
    config_path = _write_config(tmp_path, database)
    old = os.umask(0o022)
    try:
        database.touch()  # left by an older version: world-readable
        assert _mode(database) == 0o644
        config = startup.load(str(config_path), serving=True)
        assert _mode(database) == 0o600
        make_files_private()
        engine = startup.prepare_database(config)
        with engine.begin() as connection:  # a write, so -wal and -shm exist
            connection.execute(text("UPDATE pools SET enabled = enabled"))
        try:
            files = [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
            assert {f.name: _mode(f) for f in files if f.exists()} == {
                f.name: 0o600 for f in files if f.exists()
            }
            assert Path(f"{database}-wal").exists()
        finally:
            engine.dispose()
    finally:
        os.umask(old)
        crypto.configure(None)
