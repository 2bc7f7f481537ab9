"""``Client``: one method per call of the tenant API, plus waiting for a worker."""

from __future__ import annotations

import base64
import codecs
import contextlib
import email.utils
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from workerlease_client._http import Http, Retry
from workerlease_client.errors import LeaseEnded, LeaseTimeout, WorkerleaseError
from workerlease_client.models import TASK_END_STATES, LeaseInfo, LogChunk, Pool, TaskInfo

if TYPE_CHECKING:
    from workerlease_client.lease import Lease

from workerlease_client import __version__

# The service's limits (service/schemas.py): a lease call waits at most 60 s.
MAX_LEASE_WAIT_S = 60
LOG_WAIT_S = 30
DEFAULT_WAIT_S = 600.0

FileContent = bytes | os.PathLike[str]
Files = Mapping[str, FileContent] | Iterable[os.PathLike[str]]
OnWait = Callable[[LeaseInfo, float], None]


class Client:
    """The tenant API of one workerlease service.

    ``url`` and ``token`` default to ``WORKERLEASE_URL`` and ``WORKERLEASE_TOKEN``.
    Use it as a context manager (or call ``close()``)::

        with Client() as wl, wl.lease("hosted-ubuntu", wait=600) as lease:
            result = lease.run("make test")
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retry: Retry | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        url = url or os.environ.get("WORKERLEASE_URL")
        token = token or os.environ.get("WORKERLEASE_TOKEN")
        if not url:
            raise WorkerleaseError(
                "no service URL: pass url= (wl: --url) or set WORKERLEASE_URL",
                title="Configuration",
            )
        if not token:
            raise WorkerleaseError(
                "no tenant token: pass token= (wl: --token) or set WORKERLEASE_TOKEN",
                title="Configuration",
            )
        self.url = url
        self._http = Http(
            url,
            token,
            timeout=timeout,
            retry=retry or Retry(),
            user_agent=f"workerlease-client/{__version__}",
            transport=transport,
            sleep=sleep,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def pools(self) -> list[Pool]:
        body = self._http.request("GET", "/v1/pools", idempotent=True).json()
        return [Pool.from_json(p) for p in body["pools"]]

    def leases(self, state: str = "live") -> list[LeaseInfo]:
        """Your leases, newest first, every page (``next_offset``) of them."""
        items = self._every_page("/v1/leases", "leases", {"state": state})
        return [LeaseInfo.from_json(item) for item in items]

    def _every_page(
        self, path: str, key: str, params: dict[str, str | int]
    ) -> list[dict[str, Any]]:
        """Every item of a paged list, following ``next_offset``."""
        found: list[dict[str, Any]] = []
        while True:
            body = self._http.request("GET", path, idempotent=True, params=params).json()
            found.extend(body[key])
            next_offset = body.get("next_offset")
            if not isinstance(next_offset, int) or next_offset <= 0:
                return found
            params = {**params, "offset": next_offset}

    def get_lease(self, lease_id: str, wait_seconds: int = 0) -> LeaseInfo:
        """The lease; ``wait_seconds`` (at most 60): while pending, wait that long."""
        response = self._http.request(
            "GET",
            f"/v1/leases/{lease_id}",
            idempotent=True,
            params={"wait_seconds": wait_seconds} if wait_seconds else None,
            wait=wait_seconds,
        )
        return _lease(response)

    def request_lease(self, pool: str, wait_seconds: int = 0) -> LeaseInfo:
        """One ``POST /v1/leases``: active, pending, or the live lease already held
        (``existing``). Safe to repeat, so it is retried like a GET."""
        response = self._http.request(
            "POST",
            "/v1/leases",
            idempotent=True,
            json={"pool": pool, "wait_seconds": wait_seconds},
            wait=wait_seconds,
        )
        return _lease(response, existing=response.status_code == 200)

    def acquire(
        self,
        pool: str,
        wait: float = DEFAULT_WAIT_S,
        *,
        on_wait: OnWait | None = None,
        poll: int = MAX_LEASE_WAIT_S,
    ) -> LeaseInfo:
        """An active lease of ``pool``, waiting up to ``wait`` seconds for a worker.

        The request itself does not wait, so that its lease id is known before any
        waiting starts; then the pending lease is long-polled (``poll`` seconds per
        call, at most 60). When no worker came in time, or the wait is interrupted
        (an exception, Ctrl-C), the pending lease is released before raising
        (``LeaseTimeout``). A lease that fails while pending raises ``LeaseEnded``.
        """
        started = time.monotonic()
        lease = self.request_lease(pool)
        try:
            while lease.state == "pending":
                waited = time.monotonic() - started
                remaining = wait - waited
                if remaining <= 0:
                    raise LeaseTimeout(
                        f"no worker in pool {pool!r} within {wait:g} s; "
                        f"the pending lease {lease.id} was released"
                    )
                if on_wait is not None:
                    on_wait(lease, waited)
                step = max(1, min(poll, MAX_LEASE_WAIT_S, math.ceil(remaining)))
                lease = self.get_lease(lease.id, wait_seconds=step)
        except BaseException:
            self._release_quietly(lease.id)
            raise
        if lease.state != "active":
            raise LeaseEnded(
                f"lease {lease.id} is {lease.state} ({lease.end_reason or 'no reason given'})"
            )
        return lease

    def renew_lease(self, lease_id: str) -> LeaseInfo:
        response = self._http.request("POST", f"/v1/leases/{lease_id}/renew", idempotent=True)
        return _lease(response)

    def release_lease(self, lease_id: str, *, cleanup: bool = False) -> LeaseInfo:
        """Release (idempotent: an ended lease is answered as it is). ``cleanup``: after
        an interrupt, on a fresh connection with a short retry budget."""
        path = f"/v1/leases/{lease_id}"
        if cleanup:
            return _lease(self._http.cleanup("DELETE", path))
        return _lease(self._http.request("DELETE", path, idempotent=True))

    def _release_quietly(self, lease_id: str) -> None:
        with contextlib.suppress(WorkerleaseError):
            self.release_lease(lease_id, cleanup=True)

    def lease(
        self,
        pool: str,
        wait: float = DEFAULT_WAIT_S,
        *,
        renew: bool = True,
        on_wait: OnWait | None = None,
        poll: int = MAX_LEASE_WAIT_S,
    ) -> Lease:
        """A lease of ``pool`` to use in a ``with`` block: entering acquires it (waiting
        up to ``wait`` s), the block runs with it renewed in the background (``renew``),
        leaving releases it, also on an exception or Ctrl-C."""
        from workerlease_client.lease import Lease

        return Lease(self, pool, wait=wait, renew=renew, on_wait=on_wait, poll=poll)

    def attach(self, lease_id: str, *, renew: bool = True) -> Lease:
        """A lease already held (by id), to use like ``lease()``: leaving the block releases it."""
        from workerlease_client.lease import Lease

        return Lease(self, None, lease_id=lease_id, renew=renew)

    def tasks(self, lease_id: str) -> list[TaskInfo]:
        """The lease's tasks, oldest first, every page of them."""
        items = self._every_page(f"/v1/leases/{lease_id}/tasks", "tasks", {})
        return [TaskInfo.from_json(item) for item in items]

    def get_task(self, lease_id: str, task_id: str) -> TaskInfo:
        path = f"/v1/leases/{lease_id}/tasks/{task_id}"
        return TaskInfo.from_json(self._http.request("GET", path, idempotent=True).json())

    def submit_task(
        self,
        lease_id: str,
        script: str,
        *,
        image: str | None = None,
        files: Files | None = None,
        env: Mapping[str, str] | None = None,
        timeout: int | None = None,
        shell: str | None = None,
    ) -> TaskInfo:
        """Start ``script`` on the lease's worker. Never sent twice: a connection that
        breaks after sending raises ``ConnectionFailed`` (the task may exist; see ``tasks()``)."""
        body: dict[str, Any] = {"script": script}
        if image is not None:
            body["container"] = {"image": image}
        if files:
            body["files"] = encode_files(files)
        if env:
            body["env"] = dict(env)
        if timeout is not None:
            body["timeout_s"] = timeout
        if shell is not None:
            body["shell"] = shell
        response = self._http.request(
            "POST", f"/v1/leases/{lease_id}/tasks", idempotent=False, json=body
        )
        return TaskInfo.from_json(response.json())

    def cancel_task(self, lease_id: str, task_id: str, *, cleanup: bool = False) -> TaskInfo:
        """Ask for the task to be killed (202); a task that already ended is answered as
        it is. ``cleanup``: after an interrupt, as ``release_lease`` says."""
        path = f"/v1/leases/{lease_id}/tasks/{task_id}/cancel"
        if cleanup:
            return TaskInfo.from_json(self._http.cleanup("POST", path).json())
        return TaskInfo.from_json(self._http.request("POST", path, idempotent=True).json())

    def read_log(
        self, lease_id: str, task_id: str, offset: int = 0, wait_seconds: int = 0
    ) -> LogChunk:
        """The log bytes from ``offset`` (waiting up to ``wait_seconds`` for new ones)."""
        params: dict[str, int] = {"offset": offset}
        if wait_seconds:
            params["wait_seconds"] = wait_seconds
        response = self._http.request(
            "GET",
            f"/v1/leases/{lease_id}/tasks/{task_id}/log",
            idempotent=True,
            params=params,
            wait=wait_seconds,
        )
        data = response.content
        next_offset = response.headers.get("X-Next-Offset")
        return LogChunk(
            data=data,
            offset=offset,
            next_offset=int(next_offset) if next_offset else offset + len(data),
            state=response.headers.get("X-Task-State", ""),
        )

    def follow_log(
        self,
        lease_id: str,
        task_id: str,
        offset: int = 0,
        *,
        follow: bool = True,
        wait_seconds: int = LOG_WAIT_S,
    ) -> Iterator[str]:
        """The log as text chunks, from byte ``offset``: with ``follow`` until the task
        ends, else what there is now. UTF-8 is decoded incrementally, so a character
        split across two answers comes out whole; invalid bytes become U+FFFD."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            chunk = self.read_log(lease_id, task_id, offset, wait_seconds if follow else 0)
            offset = chunk.next_offset
            text = decoder.decode(chunk.data)
            if text:
                yield text
            if not chunk.data and (not follow or chunk.state in TASK_END_STATES):
                break
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail


def _lease(response: httpx.Response, *, existing: bool = False) -> LeaseInfo:
    server_time = None
    with contextlib.suppress(TypeError, ValueError):
        server_time = email.utils.parsedate_to_datetime(response.headers.get("Date", ""))
    return LeaseInfo.from_json(
        response.json(),
        existing=existing,
        server_time=server_time,
        received_at=datetime.now(UTC),
    )


def encode_files(files: Files) -> dict[str, str]:
    """``{remote path: bytes or a local path}``, or local paths (sent under their
    names), as the API's ``{remote path: base64}``."""
    items: Iterable[tuple[str, FileContent]]
    if isinstance(files, Mapping):
        items = files.items()
    else:
        items = ((Path(path).name, path) for path in files)
    encoded: dict[str, str] = {}
    for remote, content in items:
        if isinstance(content, bytes | bytearray | memoryview):
            data = bytes(content)
        elif isinstance(content, os.PathLike):
            data = Path(content).read_bytes()
        else:
            raise TypeError(
                f"file {remote!r}: pass bytes (the content) or a pathlib.Path (a local file), "
                f"not {type(content).__name__}"
            )
        encoded[remote] = base64.b64encode(data).decode("ascii")
    return encoded
