"""Tokens: random, shown once, stored as a hash, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid

TENANT_TOKEN_PREFIX = "wlt_"
ACCESS_TOKEN_PREFIX = "wla_"
BOOTSTRAP_TOKEN_PREFIX = "wlb_"
WORKER_TOKEN_PREFIX = "wlw_"


def new_token(prefix: str) -> str:
    # 32 bytes of entropy; the prefix lets secret scanners and humans tell kinds apart.
    return prefix + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def secret_equals(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def new_id(prefix: str) -> str:
    """Ids are lowercase so they are valid in container names, tags and paths."""
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


def make_files_private() -> None:
    """Everything this process creates from now on is for its own user only.

    The database (and its -wal/-shm), the key file and logs hold secrets; a worker
    running under another uid on this host must not read them, whatever umask the
    service was started with.
    """
    os.umask(0o077)
