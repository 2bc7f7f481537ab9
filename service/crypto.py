"""Secrets at rest: worker access and bootstrap tokens are encrypted in the database.

Fernet (AES-128-CBC + HMAC-SHA256) with keys from ``encryption_key`` /
``WORKERLEASE_ENCRYPTION_KEY``; several comma-separated keys allow rotation (the
first encrypts, all decrypt). Without a key (allowed on SQLite only, for the
embedded quick start) values are stored as they are. Stored values carry a
prefix so both kinds can be told apart and a key can be introduced later.
"""

from __future__ import annotations

from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import String, Text, TypeDecorator
from sqlalchemy.engine import Dialect

PREFIX = "fernet:"

_box: MultiFernet | None = None


class SecretDecryptError(RuntimeError):
    pass


def configure(keys: str | None) -> None:
    """Install the process-wide keys (called once at start, before any query)."""
    global _box
    if not keys:
        _box = None
        return
    _box = MultiFernet([Fernet(key.strip().encode()) for key in keys.split(",") if key.strip()])


def new_key() -> str:
    return Fernet.generate_key().decode()


def validate_keys(keys: str) -> None:
    for key in keys.split(","):
        Fernet(key.strip().encode())  # raises ValueError for a malformed key


def encrypt(value: str) -> str:
    if _box is None:
        return value
    return PREFIX + _box.encrypt(value.encode()).decode()


def decrypt(stored: str) -> str:
    if not stored.startswith(PREFIX):
        return stored
    if _box is None:
        raise SecretDecryptError("an encrypted secret was read but no encryption key is set")
    try:
        return _box.decrypt(stored[len(PREFIX) :].encode()).decode()
    except InvalidToken as exc:
        raise SecretDecryptError(
            "a secret could not be decrypted with the configured keys"
        ) from exc


class EncryptedString(TypeDecorator[str]):
    """A string column encrypted with the configured keys."""

    impl = String(500)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else encrypt(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else decrypt(value)


class EncryptedText(EncryptedString):
    """An encrypted column without a length limit (a task's script, env and files)."""

    impl = Text()
    cache_ok = True
