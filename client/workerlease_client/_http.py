"""HTTP with the retry rules of the client, and problem documents turned into typed errors.

What is retried, with capped exponential backoff and full jitter (or the answer's
``Retry-After`` when it has one):

- 429 and 503, whatever the call: the service answers them before doing anything
  (a waiting slot refused; the database unreachable, so nothing was committed).
- A connection that could not be made (nothing was sent), whatever the call.
- A connection that broke after the request went out, only for a call that is
  safe to repeat (``idempotent=True``: GETs, release, renew, cancel, and
  ``POST /v1/leases``, which answers a repeat with the lease already held).
  Submitting a task is not: it may have happened, so it is never sent twice.

Nothing else is retried.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from workerlease_client.errors import ConnectionFailed, WorkerleaseError, from_problem

log = logging.getLogger("workerlease_client")

RETRY_STATUSES = frozenset({429, 503})
# Raised before any byte of the request left: always safe to try again.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class Retry:
    """How hard to try: ``attempts`` in all; the n-th wait is uniform in
    ``[0, min(cap, base * 2**n)]`` unless the answer says ``Retry-After``, which is
    honoured up to ``max_retry_after`` seconds (a longer one is not waited for)."""

    attempts: int = 6
    base: float = 0.5
    cap: float = 10.0
    max_retry_after: float = 120.0

    def backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap, self.base * 2**attempt))


NO_RETRY = Retry(attempts=1)
# Cleaning up after an interrupt (cancel the task, release the lease) tries a few times
# within seconds: whoever pressed Ctrl-C is waiting for the prompt.
CLEANUP_RETRY = Retry(attempts=4, base=0.25, cap=2.0, max_retry_after=5.0)
CLEANUP_TIMEOUT_S = 10.0


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Http:
    """One ``httpx.Client`` with the base URL and the bearer token, and the retry loop."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float,
        retry: Retry,
        user_agent: str,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.retry = retry
        self.timeout = timeout
        self._sleep = sleep
        self._settings: dict[str, Any] = {
            "base_url": base_url.rstrip("/"),
            "headers": {"Authorization": f"Bearer {token}", "User-Agent": user_agent},
        }
        self._transport = transport
        self._client = httpx.Client(**self._settings, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._client.close()

    def cleanup(self, method: str, path: str) -> httpx.Response:
        """One cleanup call after an interrupt (cancel, release; all idempotent): on a
        connection of its own, because Ctrl-C may have landed inside the shared client
        (its connection mid-answer, its pool in any state), and with ``CLEANUP_RETRY``,
        so that it ends within seconds whatever the service does."""
        with httpx.Client(
            **self._settings, timeout=CLEANUP_TIMEOUT_S, transport=self._transport
        ) as client:
            return self._send(client, CLEANUP_RETRY, method, path, idempotent=True)

    def request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        wait: float = 0.0,
    ) -> httpx.Response:
        """Send, retrying as the module says; return a 2xx answer or raise a typed error.

        ``wait``: how long the service may hold the call (a long poll), added to the
        read timeout."""
        timeout = httpx.Timeout(self.timeout, read=self.timeout + wait)
        return self._send(
            self._client,
            self.retry,
            method,
            path,
            idempotent=idempotent,
            params=params,
            json=json,
            timeout=timeout,
        )

    def _send(
        self,
        client: httpx.Client,
        retry: Retry,
        method: str,
        path: str,
        *,
        idempotent: bool,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            last = attempt >= retry.attempts
            try:
                response = client.request(
                    method,
                    path,
                    params=params,
                    json=json,
                    timeout=timeout if timeout is not None else client.timeout,
                )
            except NOT_SENT as exc:
                if last:
                    raise ConnectionFailed(f"{method} {path}: {exc or type(exc).__name__}") from exc
                delay = retry.backoff(attempt - 1)
            except httpx.TransportError as exc:
                if not idempotent:
                    raise ConnectionFailed(
                        f"{method} {path}: the connection broke after the request was sent "
                        f"({exc or type(exc).__name__}); it may have been carried out and is "
                        "not repeated"
                    ) from exc
                if last:
                    raise ConnectionFailed(f"{method} {path}: {exc or type(exc).__name__}") from exc
                delay = retry.backoff(attempt - 1)
            else:
                if response.is_success:
                    return response
                error = _error(response)
                if response.status_code not in RETRY_STATUSES or last:
                    raise error
                after = retry_after_seconds(response.headers.get("Retry-After"))
                if after is not None and after > retry.max_retry_after:
                    raise error
                delay = after if after is not None else retry.backoff(attempt - 1)
            log.info(
                "retrying method=%s path=%s attempt=%d delay=%.2f", method, path, attempt, delay
            )
            self._sleep(delay)


def _error(response: httpx.Response) -> WorkerleaseError:
    try:
        body = response.json()
    except ValueError:
        body = None
    problem: dict[str, Any] = body if isinstance(body, dict) else {}
    text = response.text.strip().splitlines()
    fallback = text[0][:200] if text else response.reason_phrase or f"HTTP {response.status_code}"
    return from_problem(response.status_code, problem, fallback)
