"""The dashboard's session: a signed cookie that says "signed in with the admin token".

The signing key is derived from the admin token (HMAC-SHA256 of a fixed label keyed
with it), not stored anywhere: every web worker and every replica of a deployment has
the token, so they all accept each other's cookies with nothing to share or persist,
and changing the admin token signs everyone out (old cookies no longer verify).

The cookie is ``HttpOnly``, ``SameSite=Strict``, scoped to ``/admin/``, ``Secure`` when
the request came over https (directly, or ``X-Forwarded-Proto: https`` from the TLS
front), and lasts the browser session, at most :data:`MAX_AGE_S`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any

from flask import Flask, Request, request, session
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface

from service.security import secret_equals

COOKIE = "workerlease_admin"
MAX_AGE_S = 12 * 3600
_KEY_LABEL = b"workerlease dashboard session v1"


def secret_key(admin_token: str) -> bytes:
    return hmac.new(admin_token.encode(), _KEY_LABEL, hashlib.sha256).digest()


class DashboardSessionInterface(SecureCookieSessionInterface):
    def get_cookie_name(self, app: Flask) -> str:
        return COOKIE

    def get_cookie_path(self, app: Flask) -> str:
        return "/admin/"

    def get_cookie_httponly(self, app: Flask) -> bool:
        return True

    def get_cookie_samesite(self, app: Flask) -> str:
        return "Strict"

    def get_cookie_secure(self, app: Flask) -> bool:
        return request.is_secure or request.headers.get("X-Forwarded-Proto", "") == "https"

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        # The cookie is scoped to /admin/, so no other request carries it: those get the
        # null session at once instead of building the signing serializer (an HMAC key
        # derivation) on every API call (issue 11: 5-7% of a log chunk's CPU).
        if not request.path.startswith(self.get_cookie_path(app).rstrip("/")):
            return self.make_null_session(app)
        return super().open_session(app, request)


def configure(app: Flask) -> None:
    """Bind the session to the app (called once, when the blueprint is registered)."""
    app.secret_key = secret_key(app.config["ADMIN_TOKEN"])
    app.session_interface = DashboardSessionInterface()


def csrf_token() -> str:
    """This session's CSRF token (made on first use, also before sign-in)."""
    token = session.get("csrf")
    if not token:
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return str(token)


def csrf_ok(form: Any) -> bool:
    expected = session.get("csrf")
    given = form.get("csrf_token", "")
    return bool(expected) and secret_equals(str(given), str(expected))


def sign_in(token: str, admin_token: str) -> bool:
    if not secret_equals(token, admin_token):
        return False
    session.clear()  # a new session (and CSRF token) after sign-in: no fixation
    session["admin"] = True
    session["since"] = int(time.time())
    csrf_token()
    return True


def signed_in() -> bool:
    since = session.get("since")
    return (
        bool(session.get("admin")) and isinstance(since, int) and (time.time() - since < MAX_AGE_S)
    )


def sign_out() -> None:
    session.clear()
