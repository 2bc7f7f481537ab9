"""Worker tokens are encrypted at rest; PostgreSQL refuses to run without a key."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from service import crypto
from service.config import ConfigError, config_from_dict
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
