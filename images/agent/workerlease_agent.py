#!/usr/bin/env python3
"""workerlease worker agent: reports a worker ready and runs tenants' scripts.

Standard library only, Python 3.9+: this one file is copied into Docker images,
EC2 user data and Packer templates. See README.md beside it for the protocol.

Lifecycle: bind the HTTP server (port 0 lets the OS pick), call
``POST {WORKERLEASE_URL}/v1/workers/{id}/ready`` with the one-time bootstrap
token and the address actually bound, take the access token and the worker
token from the answer, then serve ``GET /healthz`` and ``POST /run`` and poll the
service for tasks (docs/tasks.md, "Worker protocol") until SIGTERM (exit 0).
Exit 1 when the service refuses the worker or stays unreachable; exit 2 on a
configuration error.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import http.client
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any

MAX_BODY = 1 << 20  # request bodies and the ready callback's answer
MAX_OUTPUT = 1 << 20  # captured stdout / stderr, each
MAX_DRAIN = 8 << 20  # an authenticated oversize body up to this is dropped so the 413 arrives
# An unauthenticated body up to this is read and dropped after the 401 is sent, so a
# client that sent it all before reading the answer sees the 401, not a reset. Anything
# larger is never read: the connection is closed.
MAX_REFUSED_DRAIN = 64 << 10
DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_REQUEST_TIMEOUT_S = 30
TRUNCATED = "\n[truncated]"
DEFAULT_RUN_TIMEOUT_S = 60
MAX_RUN_TIMEOUT_S = 3600
CALLBACK_TIMEOUT_S = 10.0
# The ready call's answer is the worker's only credentials, and the service spends the
# one-time bootstrap token on it: an attempt given up on while the service was still
# answering leaves a ready (maybe already leased) worker whose every retry is refused.
# So that call waits this long for its answer (within WORKERLEASE_READY_TIMEOUT_S);
# seen under load: a ready call answered after 11 s.
READY_CALL_TIMEOUT_S = 120.0
BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 30.0
RETRYABLE_4XX = {408, 429}
WINDOWS = os.name == "nt"
POSIX_SHELL = ["/bin/sh"]
WINDOWS_SHELL = [
    "powershell.exe",
    "-NoProfile",
    "-NonInteractive",
    "-ExecutionPolicy",
    "Bypass",
    "-File",
]
# Tasks (docs/tasks.md, "Worker protocol").
POLL_WAIT_S = 20
POLL_SLACK_S = 15.0  # a long poll's answer may take this much longer than wait_seconds
SERVICE_TIMEOUT_S = 30.0  # one log or finish call
MAX_REPORTED_RUNNING = 256
MAX_SERVICE_ANSWER = 256 << 20  # a poll answer carries scripts and files (10 MiB each task)
LOG_CHUNK = 1 << 20  # most bytes of one log call
MAX_UNSENT = 8 << 20  # output held for the service; beyond it the pipe is not read
LOG_FLUSH_S = 0.1  # output waits at most this long before it is sent (contract: 0.2 s)
LOG_FLUSH_BYTES = 64 << 10  # ... or until this much has gathered
READ_SIZE = 64 << 10
DRAIN_AFTER_EXIT_S = 2.0  # output still arriving after the script exited (background child)
DRAIN_AFTER_KILL_S = 1.0
SUPERVISE_S = 0.1  # how often a running task checks its deadline and cancel flag
CONTAINER_KILL_GRACE_S = 10.0  # docker kill -> the docker CLI has exited, else it is killed
DOCKER_CALL_TIMEOUT_S = 30.0
TASK_BACKOFF_FIRST_S = 0.25
TASK_BACKOFF_CAP_S = 5.0  # a service back from a restart hears from every task within this
RETRY_AFTER_CAP_S = 60.0
FINISHES_KEPT = 1024  # finished tasks remembered, to answer a re-delivery with the finish
MAX_ERROR = 1000
TAIL_KEPT = 4096  # characters of an ``error`` sent to the service
CONTAINER_PULL_VALUES = ("missing", "never", "always")
TASK_SHELLS = ("sh", "bash", "powershell", "cmd")
SCRIPT_SUFFIX = {"sh": ".sh", "bash": ".sh", "powershell": ".ps1", "cmd": ".cmd"}
POWERSHELL_ARGS = ["-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass", "-File"]
# Inside an execution container: the image's own shells, found on its PATH.
CONTAINER_SHELLS = {
    "sh": ["sh"],
    "bash": ["bash"],
    "powershell": ["powershell" if WINDOWS else "pwsh", *POWERSHELL_ARGS],
    "cmd": ["cmd", "/d", "/c"],
}
CONTAINER_WORKSPACE = "C:\\workspace" if WINDOWS else "/workspace"
CONTAINER_SCRIPT_DIR = "C:\\workerlease" if WINDOWS else "/workerlease"
# `docker run` prefixes its own errors (as opposed to the container's output) with this.
DOCKER_ERROR_PREFIX = "docker: "
# `docker run` exit codes that may mean the engine could not start the container.
DOCKER_START_FAILURES = (125, 126, 127)
SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
DRIVE = re.compile(r"^[A-Za-z]:")

_log_lock = threading.Lock()


def log(event: str, **fields: object) -> None:
    """One line per event on stderr: time, event name, key=value fields. Never a token."""
    parts = [time.strftime("%Y-%m-%dT%H:%M:%S"), "workerlease-agent", f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c.isspace() or c in "\"'=" for c in text):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    with _log_lock:
        sys.stderr.write(" ".join(parts) + "\n")
        sys.stderr.flush()


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Config:
    service_url: str
    worker_id: str
    deployment: str
    pool: str
    bootstrap_token: str
    access_token: str | None
    host: str
    port: int
    advertise_host: str
    shell: list[str]
    ready_timeout_s: float
    ca_file: str | None
    max_connections: int
    request_timeout_s: float
    docker: str = "docker"
    container_pull: str = "missing"


def load_config(environ: MutableMapping[str, str]) -> Config:
    """Read WORKERLEASE_* and remove both tokens from ``environ`` (scripts inherit it)."""
    bootstrap = environ.pop("WORKERLEASE_BOOTSTRAP_TOKEN", "")
    access = environ.pop("WORKERLEASE_ACCESS_TOKEN", "") or None
    missing = [
        name for name in ("WORKERLEASE_URL", "WORKERLEASE_WORKER_ID") if not environ.get(name)
    ]
    if not bootstrap and not access:
        missing.append("WORKERLEASE_BOOTSTRAP_TOKEN")
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}")
    host = environ.get("WORKERLEASE_AGENT_HOST") or "127.0.0.1"
    advertise = environ.get("WORKERLEASE_AGENT_ADVERTISE_HOST") or host
    if advertise in ("0.0.0.0", "::"):
        advertise = "127.0.0.1"
    shell_text = environ.get("WORKERLEASE_SHELL", "")
    shell = shlex.split(shell_text, posix=not WINDOWS) if shell_text.strip() else None
    return Config(
        service_url=environ["WORKERLEASE_URL"].rstrip("/"),
        worker_id=environ["WORKERLEASE_WORKER_ID"],
        deployment=environ.get("WORKERLEASE_DEPLOYMENT", ""),
        pool=environ.get("WORKERLEASE_POOL", ""),
        bootstrap_token=bootstrap,
        access_token=access,
        host=host,
        port=_int_env(environ, "WORKERLEASE_AGENT_PORT", 0, 0, 65535),
        advertise_host=advertise,
        shell=shell or list(WINDOWS_SHELL if WINDOWS else POSIX_SHELL),
        ready_timeout_s=float(_int_env(environ, "WORKERLEASE_READY_TIMEOUT_S", 600, 0, 86400)),
        ca_file=environ.get("WORKERLEASE_CA_FILE") or None,
        max_connections=_int_env(
            environ, "WORKERLEASE_AGENT_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS, 1, 1024
        ),
        request_timeout_s=float(
            _int_env(
                environ, "WORKERLEASE_AGENT_REQUEST_TIMEOUT_S", DEFAULT_REQUEST_TIMEOUT_S, 1, 3600
            )
        ),
        docker=environ.get("WORKERLEASE_DOCKER", "").strip() or "docker",
        container_pull=_container_pull(environ),
    )


def _container_pull(environ: MutableMapping[str, str]) -> str:
    pull = environ.get("WORKERLEASE_CONTAINER_PULL", "").strip() or "missing"
    if pull not in CONTAINER_PULL_VALUES:
        raise ConfigError(
            f"WORKERLEASE_CONTAINER_PULL must be one of {', '.join(CONTAINER_PULL_VALUES)}"
        )
    return pull


def _int_env(
    environ: MutableMapping[str, str], name: str, default: int, low: int, high: int
) -> int:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name} is not an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in {low}..{high}")
    return value


class ScriptRunner:
    """Runs scripts with the configured shell; remembers running ones to kill at shutdown."""

    def __init__(self, shell: list[str]) -> None:
        self.shell = shell
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()
        self._closed = False

    def run(self, script: str, timeout_s: int) -> dict[str, Any]:
        """Run ``script`` from a temporary file, not stdin: a command in the script that
        reads stdin would otherwise swallow the rest of the script. Output goes to
        temporary files, not pipes, so a background child that keeps them open
        (``sleep 300 &``) does not hold the answer back."""
        fd, path = tempfile.mkstemp(prefix="workerlease-run-", suffix=_script_suffix(self.shell))
        try:
            # PowerShell 5 reads a BOM-less script as ANSI; the BOM makes it UTF-8.
            encoding = "utf-8-sig" if WINDOWS else "utf-8"
            with os.fdopen(fd, "w", encoding=encoding, newline="") as file:
                file.write(script)
            with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
                exit_code, timed_out = self._run_file(path, out, err, timeout_s)
                return {
                    "exit_code": exit_code,
                    "stdout": _read_capped(out),
                    "stderr": _read_capped(err),
                    "timed_out": timed_out,
                }
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _run_file(
        self, path: str, out: IO[bytes], err: IO[bytes], timeout_s: int
    ) -> tuple[int, bool]:
        with self._lock:
            if self._closed:
                raise OSError("agent is shutting down")
            proc = subprocess.Popen(
                [*self.shell, path],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=dict(os.environ),
                # own process group, so a timeout kills the script and its children
                start_new_session=not WINDOWS,
                creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0),
            )
            self._running.add(proc)
        try:
            return proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            proc.wait()
            return -1, True
        finally:
            with self._lock:
                self._running.discard(proc)

    def close(self) -> None:
        """Refuse new scripts and kill the running ones."""
        with self._lock:
            self._closed = True
            running = list(self._running)
        for proc in running:
            _kill_tree(proc)


def _script_suffix(shell: list[str]) -> str:
    program = os.path.basename(shell[0]).lower()
    if program.startswith(("powershell", "pwsh")):
        return ".ps1"
    if program.startswith("cmd"):
        return ".cmd"
    return ".sh" if not WINDOWS else ".txt"


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    if proc.returncode is not None:
        return  # already reaped: its pid (and so its group id) may belong to someone else
    if WINDOWS:
        subprocess.run(
            ["taskkill", "/F", "/T", "/PID", str(proc.pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        proc.kill()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _read_capped(file: IO[bytes]) -> str:
    file.seek(0)
    data = file.read(MAX_OUTPUT + 1)
    if len(data) > MAX_OUTPUT:
        return data[:MAX_OUTPUT].decode("utf-8", "replace") + TRUNCATED
    return data.decode("utf-8", "replace")


def _refusal(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
    )
    return head.encode() + body


BUSY_RESPONSE = _refusal(503, "Service Unavailable", "too many connections")


class AgentServer(ThreadingHTTPServer):
    """One thread per connection, at most ``config.max_connections`` of them.

    A connection beyond the limit is answered 503 and closed by the accept loop itself,
    so it never gets a thread. Each connection must deliver its whole request (headers
    and body) within ``config.request_timeout_s``, however slowly it trickles: a
    per-read socket timeout alone lets a client that sends a byte now and then hold its
    thread forever. The accept loop (``service_actions``) closes overdue connections.
    """

    daemon_threads = True

    def __init__(self, config: Config, runner: ScriptRunner) -> None:
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), AgentHandler)
        self.config = config
        self.runner = runner
        self._access_token = config.access_token
        self._slots = threading.BoundedSemaphore(config.max_connections)
        # connection -> monotonic deadline for its request to have arrived
        self._reading: dict[socket.socket, float] = {}
        self._reading_lock = threading.Lock()
        self._refused = 0  # touched by the accept loop only
        self._refused_logged_at = 0.0

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def set_access_token(self, token: str) -> None:
        if self._access_token is None:
            self._access_token = token

    def auth_status(self, header: str | None) -> int:
        """200, 401 (missing or wrong token) or 503 (no access token yet)."""
        expected = self._access_token
        if expected is None:
            return 503
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return 401
        ok = hmac.compare_digest(given.strip().encode(), expected.encode())
        return 200 if ok else 401

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refused += 1
            with contextlib.suppress(OSError):
                request.setblocking(False)  # never let a client stall the accept loop
                request.send(BUSY_RESPONSE)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # no thread was started to release it
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def reading(self, connection: socket.socket) -> None:
        """``connection``'s request must have arrived within the request timeout."""
        with self._reading_lock:
            self._reading[connection] = time.monotonic() + self.config.request_timeout_s

    def done_reading(self, connection: socket.socket) -> None:
        """Called before the connection is closed, so it is never shut down after."""
        with self._reading_lock:
            self._reading.pop(connection, None)

    def service_actions(self) -> None:
        """Run by ``serve_forever`` about every 0.5 s: cut overdue requests, log refusals."""
        now = time.monotonic()
        with self._reading_lock:
            overdue = [conn for conn, deadline in self._reading.items() if deadline <= now]
            for conn in overdue:
                del self._reading[conn]
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)  # the handler's read returns; it closes
        if overdue:
            log("request_timed_out", connections=len(overdue))
        if self._refused and now - self._refused_logged_at >= 1.0:
            log("connections_refused", count=self._refused, limit=self.config.max_connections)
            self._refused = 0
            self._refused_logged_at = now

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line instead of socketserver's traceback on stderr."""
        exc = sys.exc_info()[1]
        log("connection_error", error=f"{type(exc).__name__}: {exc}"[:200])


class AgentHandler(BaseHTTPRequestHandler):
    server: AgentServer
    server_version = "workerlease-agent/1"

    def setup(self) -> None:
        super().setup()
        # Per read and write: a silent client, or one that never reads the answer.
        self.connection.settimeout(self.server.config.request_timeout_s)
        self.server.reading(self.connection)

    def finish(self) -> None:
        self.server.done_reading(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self.server.done_reading(self.connection)
        if self.path.split("?", 1)[0] == "/healthz":
            self._send(200, {"status": "ok"})  # nothing about the worker: no auth here
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/run":
            self._refuse(404, "not found")
            return
        # The token is checked before any of the body is read.
        status = self.server.auth_status(self.headers.get("Authorization"))
        if status != 200:
            message = "agent not ready" if status == 503 else "missing or invalid access token"
            self._refuse(status, message)
            return
        body = self._read_body()
        if body is None:
            return
        self.server.done_reading(self.connection)
        try:
            script, timeout_s = _parse_run(body)
        except ValueError as exc:
            self._send(400, {"error": str(exc)})
            return
        started = time.monotonic()
        log("run_started", timeout_s=timeout_s)
        try:
            result = self.server.runner.run(script, timeout_s)
        except OSError as exc:
            log("run_failed", error=type(exc).__name__)
            self._send(500, {"error": f"cannot run the script: {exc}"})
            return
        log(
            "run_finished",
            exit_code=result["exit_code"],
            timed_out=result["timed_out"],
            duration_ms=int((time.monotonic() - started) * 1000),
        )
        self._send(200, result)

    def _method_not_allowed(self) -> None:
        self._refuse(405, "method not allowed")

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def _refuse(self, status: int, message: str) -> None:
        """Answer without reading the body; then drop a small one so the client, which
        may have sent it all before reading, gets the answer rather than a reset. A
        larger body is never read: closing the connection resets it."""
        self._send(status, {"error": message})
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return
        if 0 < length <= MAX_REFUSED_DRAIN:
            self._drain(length)

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering 400/411/413 (or when it was cut)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._send(411, {"error": "chunked bodies are not supported; send Content-Length"})
            return None
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._send(411, {"error": "Content-Length required"})
            return None
        if length < 0:
            self._send(400, {"error": "bad Content-Length"})
            return None
        if length > MAX_BODY:
            # An authenticated client: read what it sent (within reason) so it sees the 413.
            self._drain(min(length, MAX_DRAIN))
            self._send(413, {"error": f"body larger than {MAX_BODY} bytes"})
            return None
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True  # the client went away or ran out of time
            return None
        return body

    def _drain(self, length: int) -> None:
        try:
            while length > 0:
                chunk = self.rfile.read(min(length, 65536))
                if not chunk:
                    break
                length -= len(chunk)
        except OSError:
            pass

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.close_connection = True
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client went away

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are logged by log_request below, errors by send_error

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log("http_request", method=self.command, path=self.path, status=code)


def _parse_run(body: bytes) -> tuple[str, int]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: e.g. 200000 nested "["
        raise ValueError("body is not valid JSON, or is nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    unknown = sorted(set(data) - {"script", "timeout_s"})
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(unknown)}")
    script = data.get("script")
    if not isinstance(script, str):
        raise ValueError("'script' must be a string")
    timeout_s = data.get("timeout_s", DEFAULT_RUN_TIMEOUT_S)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int):
        raise ValueError("'timeout_s' must be an integer")
    if not 1 <= timeout_s <= MAX_RUN_TIMEOUT_S:
        raise ValueError(f"'timeout_s' must be in 1..{MAX_RUN_TIMEOUT_S}")
    return script, timeout_s


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the bootstrap token elsewhere: treat it as a refusal."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verification of an ``https`` service URL: the system's trust store, plus
    ``ca_file`` (PEM) when given; the host name must match the certificate."""
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(f"WORKERLEASE_CA_FILE {ca_file!r}: {exc}") from None
    return context


def _certificate_error(exc: BaseException) -> str | None:
    """Why the service's certificate was refused, if that is what ``exc`` is about."""
    for candidate in (exc, getattr(exc, "reason", None)):  # URLError wraps it in .reason
        if isinstance(candidate, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {candidate.verify_message or candidate}"
    return None


@dataclass(frozen=True)
class ReadyAnswer:
    access_token: str
    worker_token: str | None  # None: a service without tasks; /run only


def report_ready(
    config: Config, agent_url: str, stop: threading.Event, context: ssl.SSLContext
) -> ReadyAnswer | None:
    """Call the ready callback until it answers; return the tokens or None.

    A certificate that fails verification is final, like a 4xx: retrying cannot make it
    valid, and the bootstrap token is only ever sent once the service is verified."""
    worker = urllib.parse.quote(config.worker_id, safe="")
    url = f"{config.service_url}/v1/workers/{worker}/ready"
    body = json.dumps({"agent_url": agent_url, "address": config.advertise_host}).encode()
    opener = urllib.request.build_opener(
        _NoRedirect(), urllib.request.HTTPSHandler(context=context)
    )
    deadline = time.monotonic() + config.ready_timeout_s
    delay = BACKOFF_FIRST_S
    attempt = unanswered = 0
    while not stop.is_set():
        attempt += 1
        request = urllib.request.Request(url, data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        request.add_header("Authorization", f"Bearer {config.bootstrap_token}")
        timeout = min(READY_CALL_TIMEOUT_S, max(1.0, deadline - time.monotonic()))
        try:
            with opener.open(request, timeout=timeout) as response:
                answer = response.read(MAX_BODY)
            return _tokens_from(answer, config)
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code not in RETRYABLE_4XX:
                # After an attempt that got no answer, a 401 most likely means that one
                # was taken: the token is spent and the worker has to be replaced.
                log("ready_refused", status=exc.code, attempt=attempt, unanswered=unanswered)
                return None
            reason = f"http_{exc.code}"
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            certificate = _certificate_error(exc)
            if certificate is not None:
                log("ready_refused", reason="certificate", error=certificate, attempt=attempt)
                return None
            reason = type(exc).__name__
            unanswered += 1
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            log("ready_gave_up", attempts=attempt, reason=reason)
            return None
        pause = min(delay * random.uniform(0.5, 1.0), remaining)
        log("ready_retry", attempt=attempt, reason=reason, retry_in_s=round(pause, 2))
        stop.wait(pause)
        delay = min(delay * 2, BACKOFF_CAP_S)
    return None


def _tokens_from(answer: bytes, config: Config) -> ReadyAnswer | None:
    try:
        data = json.loads(answer)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        data = {}
    # An operator-given access token wins over the service's.
    token = config.access_token or data.get("access_token")
    if not isinstance(token, str) or not token:
        log("ready_bad_answer")
        return None
    worker_token = data.get("worker_token")
    if not isinstance(worker_token, str) or not worker_token:
        worker_token = None
    return ReadyAnswer(token, worker_token)


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


class ServiceClient:
    """The worker's calls to the service, with the worker token.

    Every call is retried on connection errors, 5xx, 408 and 429 with capped exponential
    backoff and jitter (a ``Retry-After`` is honoured), for as long as ``alive()`` holds:
    a service restart or a network blip costs time, never output. Any other answer is
    returned; redirects are never followed (the token would go with them)."""

    def __init__(
        self, config: Config, token: str, context: ssl.SSLContext, stop: threading.Event
    ) -> None:
        self._base = (
            f"{config.service_url}/v1/workers/{urllib.parse.quote(config.worker_id, safe='')}"
        )
        self._token = token
        self._stop = stop
        self._opener = urllib.request.build_opener(
            _NoRedirect(), urllib.request.HTTPSHandler(context=context)
        )

    def call(
        self,
        what: str,
        path: str,
        payload: bytes,
        alive: Callable[[], bool],
        timeout: float = SERVICE_TIMEOUT_S,
        content_type: str = "application/json",
        **fields: object,
    ) -> Answer | None:
        """POST ``payload`` to ``path`` (below the worker's URL); None once not ``alive()``."""
        delay = TASK_BACKOFF_FIRST_S
        attempt = 0
        while alive():
            attempt += 1
            request = urllib.request.Request(self._base + path, data=payload, method="POST")
            request.add_header("Content-Type", content_type)
            request.add_header("Authorization", f"Bearer {self._token}")
            retry_after: float | None = None
            try:
                with self._opener.open(request, timeout=timeout) as response:
                    answer = Answer(
                        response.status, _json_object(response.read(MAX_SERVICE_ANSWER))
                    )
                if attempt > 1:
                    log("service_back", call=what, attempts=attempt, **fields)
                return answer
            except urllib.error.HTTPError as exc:
                with exc:
                    if exc.code < 500 and exc.code not in RETRYABLE_4XX:
                        with contextlib.suppress(OSError, http.client.HTTPException):
                            return Answer(exc.code, _json_object(exc.read(MAX_BODY)))
                        return Answer(exc.code, {})
                    reason = f"http_{exc.code}"
                    retry_after = _retry_after(exc.headers.get("Retry-After"))
            except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
                reason = _certificate_error(exc) or type(exc).__name__
            pause = delay * random.uniform(0.5, 1.0)
            if retry_after is not None:
                pause = max(pause, retry_after)
            if attempt == 1 or attempt % 10 == 0:
                log(
                    "service_retry",
                    call=what,
                    attempt=attempt,
                    reason=reason,
                    retry_in_s=round(pause, 2),
                    **fields,
                )
            self._stop.wait(pause)
            delay = min(delay * 2, TASK_BACKOFF_CAP_S)
        return None


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data) if data else {}
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _retry_after(header: str | None) -> float | None:
    """Seconds of a ``Retry-After: <seconds>`` header (an HTTP date is ignored)."""
    try:
        return min(max(float(header or ""), 0.0), RETRY_AFTER_CAP_S)
    except ValueError:
        return None


class Output:
    """A task's output stream between the pipe and the service.

    Bytes from ``base`` on are held until the service has ``received`` them; at most
    ``MAX_UNSENT`` unacknowledged bytes, beyond which ``append`` blocks (the reader stops
    reading, the script blocks on its next write: backpressure). After ``discard`` the
    bytes are counted, not kept. After ``abandon`` nothing more is counted."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._data = bytearray()
        self._base = 0  # stream offset of _data[0]
        self._total = 0  # bytes of the stream read from the pipe
        self._acked = 0  # the service holds the stream up to here
        self._pending_since: float | None = None  # when unsent bytes started to wait
        self._eof = False
        self._discarded = False
        self._abandoned = False
        self._tail = b""  # the stream's last bytes, sent or not (the engine's error)

    @property
    def total(self) -> int:
        with self._cond:
            return self._total

    @property
    def discarded(self) -> bool:
        with self._cond:
            return self._discarded

    def append(self, data: bytes) -> bool:
        """Add what the pipe gave; False when the stream was abandoned (stop reading)."""
        with self._cond:
            while (
                not self._discarded
                and not self._abandoned
                and self._total - self._acked >= MAX_UNSENT
            ):
                self._cond.wait()
            if self._abandoned:
                return False
            self._tail = (self._tail + data)[-TAIL_KEPT:]
            if not self._discarded:
                if self._total == self._acked:
                    self._pending_since = time.monotonic()
                self._data += data
            self._total += len(data)
            self._cond.notify_all()
            return True

    def tail(self) -> bytes:
        with self._cond:
            return self._tail

    def end(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def abandon(self) -> None:
        """The pipe is still held open (by a process that left the group): stop here."""
        with self._cond:
            self._abandoned = self._eof = True
            self._cond.notify_all()

    def wait_end(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._eof, timeout)

    def discard(self) -> None:
        """The service keeps no more of this log: stop holding and sending output."""
        with self._cond:
            self._discarded = True
            self._data = bytearray()
            self._base = self._acked = self._total
            self._cond.notify_all()

    def next_chunk(self) -> tuple[int, bytes] | None:
        """Wait for output worth sending; (offset, bytes), or None when all is sent."""
        with self._cond:
            while True:
                if self._discarded:
                    return None
                pending = self._total - self._acked
                if pending <= 0:
                    if self._eof:
                        return None
                    self._cond.wait()
                    continue
                due = (self._pending_since or 0.0) + LOG_FLUSH_S
                wait = due - time.monotonic()
                if self._eof or pending >= LOG_FLUSH_BYTES or wait <= 0:
                    start = self._acked - self._base
                    return self._acked, bytes(self._data[start : start + LOG_CHUNK])
                self._cond.wait(wait)

    def acknowledge(self, received: int) -> bool:
        """The service holds the stream up to ``received``; drop what is before it.
        False when it asks for bytes no longer held (it lost what it had acknowledged)."""
        with self._cond:
            if received < self._base:
                return False
            self._acked = min(received, self._total)
            del self._data[: self._acked - self._base]
            self._base = self._acked
            # What is still unsent has waited long enough: send it at once.
            self._pending_since = 0.0 if self._total > self._acked else None
            self._cond.notify_all()
            return True


@dataclass
class Outcome:
    outcome: str  # exited | timed_out | cancelled | failed_to_start
    exit_code: int | None = None
    error: str | None = None


class Task:
    """One task: its directory, its process (or container), its output, its finish."""

    def __init__(self, spec: dict[str, Any], agent: TaskAgent) -> None:
        self.id: str = spec["id"]
        self.spec = spec
        self.agent = agent
        self.output = Output()
        self._cancel = threading.Event()
        self._cancel_reason = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.container: str | None = None

    def cancel(self, reason: str) -> None:
        if not self._cancel.is_set():
            self._cancel_reason = reason
            log("task_cancel", task=self.id, reason=reason)
            self._cancel.set()

    def alive(self) -> bool:
        return self.agent.alive()

    def run(self) -> None:
        """The task's thread: run it, send its output, report its end."""
        started = time.monotonic()
        dirs: list[str] = []
        try:
            outcome = self._execute(dirs)
        except Exception as exc:  # a bug must still end the task on the service
            log("task_error", task=self.id, error=f"{type(exc).__name__}: {exc}"[:200])
            outcome = Outcome("failed_to_start", error=f"agent error: {type(exc).__name__}")
        finally:
            for path in dirs:
                shutil.rmtree(path, ignore_errors=True)
        log(
            "task_ended",
            task=self.id,
            outcome=outcome.outcome,
            exit_code=outcome.exit_code,
            log_bytes=self.output.total,
            duration_ms=int((time.monotonic() - started) * 1000),
        )
        self.agent.finished(self, self._finish(outcome))

    def _execute(self, dirs: list[str]) -> Outcome:
        try:
            command, cwd, env = self._prepare(dirs)
        except ValueError as exc:
            log("task_refused", task=self.id, error=str(exc)[:200])
            return Outcome("failed_to_start", error=str(exc)[:MAX_ERROR])
        try:
            self.proc = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,  # one pipe: stdout and stderr in the order written
                bufsize=0,
                start_new_session=not WINDOWS,
                creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0),
            )
        except OSError as exc:
            log("task_refused", task=self.id, error=type(exc).__name__)
            return Outcome("failed_to_start", error=f"cannot start {command[0]}: {exc}"[:MAX_ERROR])
        log(
            "task_started",
            task=self.id,
            shell=self.spec.get("shell") or "sh",
            container=bool(self.container),
        )
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        sender = threading.Thread(target=self._send, daemon=True)
        sender.start()
        killed = self._supervise(self.proc)
        self._drain(self.proc)
        if self.container:
            _docker(self.agent.config.docker, "rm", "--force", self.container)
        sender.join()
        if killed:
            return Outcome(killed)
        code = self.proc.returncode
        if self.container and code in DOCKER_START_FAILURES:
            engine_error = self._engine_error()
            if engine_error:
                return Outcome("failed_to_start", error=engine_error)
        return Outcome("exited", exit_code=128 - code if code < 0 else code)

    def _prepare(self, dirs: list[str]) -> tuple[list[str], str, dict[str, str]]:
        """Make the task's directory, write its files and script; the command to run."""
        spec = self.spec
        shell = spec.get("shell") or ("powershell" if WINDOWS else "sh")
        if shell not in TASK_SHELLS:
            raise ValueError(f"unknown shell {str(shell)[:40]!r}")
        env = spec.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ValueError("'env' must map names to strings")
        script = spec.get("script")
        if not isinstance(script, str):
            raise ValueError("'script' must be a string")
        container = spec.get("container")
        image = container.get("image") if isinstance(container, dict) else None
        if container is not None and (not isinstance(image, str) or not image):
            raise ValueError('\'container\' must be {"image": "<name:tag>"}')
        root = self.agent.task_root()
        safe = SAFE_NAME.sub("-", self.id)[:64]
        workdir = tempfile.mkdtemp(prefix=f"{safe}-", dir=root)  # 0700
        dirs.append(workdir)
        # The script lives outside the task's directory: the script cannot overwrite it,
        # and files cannot collide with it.
        script_dir = tempfile.mkdtemp(prefix=f"{safe}-script-", dir=root)
        dirs.append(script_dir)
        write_files(workdir, spec.get("files") or {})
        script_path = os.path.join(script_dir, "script" + SCRIPT_SUFFIX[shell])
        # PowerShell 5 reads a BOM-less script as ANSI; the BOM makes it UTF-8.
        encoding = "utf-8-sig" if shell == "powershell" else "utf-8"
        with open(script_path, "w", encoding=encoding, newline="") as file:
            file.write(script)
        full_env = dict(os.environ)  # the tokens were removed from it at start
        full_env.update(env)
        if image is None:
            return [*_host_shell(shell), script_path], workdir, full_env
        self.container = "wl-" + SAFE_NAME.sub("-", self.id)
        command = docker_run_command(
            self.agent.config, self.container, self.id, image, shell, workdir, script_path, env
        )
        return command, workdir, full_env

    def _read(self, pipe: IO[bytes]) -> None:
        """Pipe -> output, until the pipe ends or the stream is abandoned."""
        try:
            while True:
                data = pipe.read(READ_SIZE)  # unbuffered: what the pipe has now
                if not data or not self.output.append(data):
                    break
        except (OSError, ValueError):
            pass
        finally:
            self.output.end()
            with contextlib.suppress(OSError):
                pipe.close()

    def _send(self) -> None:
        """Output -> the log endpoint, continuing from what the service says it holds."""
        quoted = urllib.parse.quote(self.id, safe="")
        while True:
            chunk = self.output.next_chunk()
            if chunk is None:
                return
            offset, data = chunk
            answer = self.agent.client.call(
                "log",
                f"/tasks/{quoted}/log?offset={offset}",
                data,
                self.alive,
                content_type="application/octet-stream",
                task=self.id,
            )
            if answer is None:
                return
            received = _int_or_none(answer.body.get("received"))
            if answer.status != 200 or received is None:
                self._refused("log", answer)
                return
            if answer.body.get("cancel"):
                self.cancel("service")
            if answer.body.get("discard") and not self.output.discarded:
                log("task_log_discarded", task=self.id, received=received)
                self.output.discard()
            elif not self.output.acknowledge(received):
                log("task_log_gap", task=self.id, received=received)
                self.output.discard()

    def _refused(self, what: str, answer: Answer) -> None:
        """The service did not take a chunk. 401/403: the worker's credential is gone;
        404: the service does not know the task; both kill it. Anything else stops the
        sending only: the output stays held (backpressure beyond ``MAX_UNSENT``) and the
        finish's 409 asks for it again."""
        log(f"task_{what}_refused", task=self.id, status=answer.status)
        if answer.status in (401, 403):
            self.agent.revoked_by(f"{what}_{answer.status}")
        if answer.status in (401, 403, 404):
            self.cancel(f"{what}_refused")

    def _supervise(self, proc: subprocess.Popen[bytes]) -> str | None:
        """Wait for the process; kill it at its deadline or on cancel. Returns the
        outcome of a kill (timed_out, cancelled), None when it exited by itself."""
        timeout_s = _int_or_none(self.spec.get("timeout_s"))
        timeout = float(timeout_s) if timeout_s and timeout_s > 0 else 3600.0
        deadline = time.monotonic() + timeout
        killed: str | None = None
        first_kill = next_kill = 0.0
        while proc.poll() is None:
            now = time.monotonic()
            if killed is None:
                if self._cancel.is_set() or not self.alive():
                    killed = "cancelled"
                elif now >= deadline:
                    killed = "timed_out"
                    log("task_timed_out", task=self.id, timeout_s=int(timeout))
                first_kill = now
            if killed is None:
                self._cancel.wait(SUPERVISE_S)
                continue
            if now >= next_kill:
                self._kill(proc, escalate=now - first_kill >= CONTAINER_KILL_GRACE_S)
                next_kill = now + (1.0 if self.container else 0.5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(SUPERVISE_S)
        return killed

    def _kill(self, proc: subprocess.Popen[bytes], escalate: bool) -> None:
        """The container (``docker kill``; the CLI too if it lingers), else the process
        group or tree."""
        if self.container and not escalate:
            _docker(self.agent.config.docker, "kill", self.container)
            return
        _kill_tree(proc)

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        """The script has exited: what it wrote is still in the pipe. A background child
        that keeps the pipe open must not hold the finish: after a short wait its group
        is killed, and if the pipe is still held (a process that left the group), the
        rest of the output is abandoned."""
        if self.output.wait_end(DRAIN_AFTER_EXIT_S):
            return
        if not WINDOWS:
            # The group's id is still reserved: a live member holds the pipe open.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if not self.output.wait_end(DRAIN_AFTER_KILL_S):
            log("task_output_abandoned", task=self.id)
            self.output.abandon()

    def _engine_error(self) -> str | None:
        """The engine's own message when `docker run` could not start the container."""
        tail = self.output.tail().decode("utf-8", "replace")
        for line in reversed(tail.splitlines()):
            if line.startswith(DOCKER_ERROR_PREFIX):
                return line[len(DOCKER_ERROR_PREFIX) :].strip()[:MAX_ERROR]
        return None

    def _finish(self, outcome: Outcome) -> dict[str, Any]:
        """Report the end until the service takes it; send missing output on 409."""
        body = {
            "outcome": outcome.outcome,
            "exit_code": outcome.exit_code,
            "error": outcome.error,
            "log_bytes": self.output.total,
        }
        self.agent.send_finish(self.id, body, self.output, self._send)
        return body


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def write_files(workdir: str, files: object) -> None:
    """Write a task's ``files`` (relative path -> base64) under ``workdir``.

    The service checked the paths already; they are checked again here, where it
    matters: relative, ``/``-separated, no empty, ``.`` or ``..`` segment, no
    backslash, no drive letter. Raises ValueError naming the path."""
    if not isinstance(files, dict):
        raise ValueError("'files' must map paths to base64 content")
    root = os.path.realpath(workdir)
    for name, content in files.items():
        parts = _relative_parts(name)
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise ValueError(f"file {name[:200]!r}: content is not base64") from None
        target = os.path.join(root, *parts)
        if os.path.commonpath([root, os.path.realpath(target)]) != root:
            raise ValueError(f"file {name[:200]!r} escapes the task directory")
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "xb") as file:
                file.write(data)
        except OSError as exc:
            raise ValueError(f"file {name[:200]!r}: {exc.strerror or exc}") from None


def _relative_parts(name: object) -> list[str]:
    if not isinstance(name, str) or not name:
        raise ValueError("a file has an empty path")
    if (
        "\\" in name
        or "\0" in name
        or name.startswith("/")
        or DRIVE.match(name)
        or (WINDOWS and ":" in name)
    ):
        raise ValueError(f"file {name[:200]!r} is not a relative path")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"file {name[:200]!r} has an empty, '.' or '..' segment")
    return parts


def _host_shell(shell: str) -> list[str]:
    """The command line a script file's path is appended to, for ``shell`` on this host."""
    if shell == "sh":
        program = "/bin/sh" if not WINDOWS else shutil.which("sh")
        found = [program] if program else None
    elif shell == "bash":
        program = shutil.which("bash")
        found = [program] if program else None
    elif shell == "powershell":
        program = shutil.which("powershell.exe") or shutil.which("pwsh")
        found = [program, *POWERSHELL_ARGS] if program else None
    else:
        program = shutil.which("cmd.exe") if WINDOWS else None
        found = [program, "/d", "/c"] if program else None
    if not found:
        raise ValueError(f"shell {shell!r} is not available on this worker")
    return found


def docker_run_command(
    config: Config,
    name: str,
    task_id: str,
    image: str,
    shell: str,
    workdir: str,
    script_path: str,
    env: dict[str, str],
) -> list[str]:
    """``docker run`` of ``image`` for a task (docs/tasks.md, "Execution containers").

    The values of ``env`` reach the container through the CLI's environment (``-e NAME``),
    never its command line. ``--entrypoint ""``: the image's entrypoint (an agent, a
    server) would otherwise get the shell as its arguments. On POSIX the container runs
    as the agent's uid and gid: the task directory (0700) is the agent's, and what the
    script leaves there stays removable by it."""
    script_dir, script_file = os.path.split(script_path)
    separator = "\\" if WINDOWS else "/"
    command = [
        config.docker,
        "run",
        "--rm",
        "--name",
        name,
        "--label",
        f"workerlease.task={task_id}",
        "--pull",
        config.container_pull,
        "--entrypoint",
        "",
        "-v",
        f"{workdir}:{CONTAINER_WORKSPACE}",
        "-w",
        CONTAINER_WORKSPACE,
        "-v",
        f"{script_dir}:{CONTAINER_SCRIPT_DIR}:ro",
    ]
    if not WINDOWS:
        command += ["--user", f"{os.getuid()}:{os.getgid()}"]
    for key in env:
        command += ["-e", key]
    return [
        *command,
        image,
        *_joined_streams(shell),
        *CONTAINER_SHELLS[shell],
        f"{CONTAINER_SCRIPT_DIR}{separator}{script_file}",
    ]


def _joined_streams(shell: str) -> list[str]:
    """A prefix that runs the shell with its stderr on its stdout, inside the container.

    `docker run` without a terminal carries stdout and stderr as two streams and its CLI
    writes each from a goroutine of its own, so sharing one pipe outside the container
    does not keep their order ("to-stderr" came before an earlier stdout line in CI).
    Joining them in the container does. POSIX images only: a Windows container gets no
    prefix and its order is the engine's."""
    if WINDOWS:
        return []
    joiner = "bash" if shell == "bash" else "sh"  # the shell the image is known to have
    return [joiner, "-c", 'exec "$@" 2>&1', joiner]


def _docker(docker: str, *args: str) -> None:
    """A `docker` housekeeping call (kill, rm); its failure ("No such container") is fine."""
    try:
        subprocess.run(
            [docker, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=DOCKER_CALL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log("docker_call_failed", call=args[0], error=type(exc).__name__)


class TaskAgent:
    """The poll loop and the tasks it started; one per agent."""

    def __init__(self, config: Config, client: ServiceClient, stop: threading.Event) -> None:
        self.config = config
        self.client = client
        self.stop = stop
        self.revoked = threading.Event()
        self._lock = threading.Lock()
        self._active: dict[str, Task] = {}
        self._resending: set[str] = set()
        self._finishes: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._root: str | None = None

    def alive(self) -> bool:
        return not self.stop.is_set() and not self.revoked.is_set()

    def task_root(self) -> str:
        """A fresh 0700 directory holding the tasks' directories, made on first use."""
        with self._lock:
            if self._root is None:
                self._root = tempfile.mkdtemp(prefix="workerlease-tasks-")
            return self._root

    def poll_forever(self) -> None:
        delay = TASK_BACKOFF_FIRST_S
        while self.alive():
            with self._lock:
                running = [*self._active, *self._resending][:MAX_REPORTED_RUNNING]
            body = json.dumps({"running": running, "wait_seconds": POLL_WAIT_S}).encode()
            answer = self.client.call(
                "poll", "/poll", body, self.alive, timeout=POLL_WAIT_S + POLL_SLACK_S
            )
            if answer is None:
                break
            if answer.status in (401, 403):
                self.revoked_by(f"poll_{answer.status}")
                break
            if answer.status != 200:
                # Not worth a tight loop; the service may be mid-deploy.
                log("poll_refused", status=answer.status)
                self.stop.wait(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, TASK_BACKOFF_CAP_S)
                continue
            delay = TASK_BACKOFF_FIRST_S
            self._take(answer.body)

    def revoked_by(self, reason: str) -> None:
        """The worker's credential no longer works: the worker is being destroyed."""
        if not self.revoked.is_set():
            log("worker_revoked", reason=reason)
            self.revoked.set()

    def _take(self, body: dict[str, Any]) -> None:
        cancel = body.get("cancel")
        for task_id in cancel if isinstance(cancel, list) else []:
            with self._lock:
                task = self._active.get(task_id) if isinstance(task_id, str) else None
            if task is not None:
                task.cancel("service")
        tasks = body.get("tasks")
        for spec in tasks if isinstance(tasks, list) else []:
            task_id = spec.get("id") if isinstance(spec, dict) else None
            if not isinstance(task_id, str) or not task_id:
                log("poll_bad_task")
                continue
            with self._lock:
                if task_id in self._active or task_id in self._resending:
                    continue  # already running, or its finish is on its way
                finish = self._finishes.get(task_id)
                task = Task(spec, self) if finish is None else None
                if task is None:
                    self._resending.add(task_id)
                else:
                    self._active[task_id] = task
            if task is None:
                log("task_redelivered", task=task_id)
                threading.Thread(target=self._resend, args=(task_id, finish), daemon=True).start()
            else:
                threading.Thread(target=task.run, name=f"task-{task_id}", daemon=True).start()

    def _resend(self, task_id: str, finish: dict[str, Any]) -> None:
        try:
            self.send_finish(task_id, finish, None, None)
        finally:
            with self._lock:
                self._resending.discard(task_id)

    def send_finish(
        self,
        task_id: str,
        body: dict[str, Any],
        output: Output | None,
        send: Callable[[], None] | None,
    ) -> None:
        """POST the finish until it is taken. A 409 names what the service holds: the
        rest of the output goes again from there (when it is still held), then the
        finish again."""
        path = f"/tasks/{urllib.parse.quote(task_id, safe='')}/finish"
        payload = json.dumps(body).encode()
        conflicts = 0
        while True:
            answer = self.client.call("finish", path, payload, self.alive, task=task_id)
            if answer is None:
                return
            if answer.status == 200:
                return
            received = _int_or_none(answer.body.get("received"))
            if answer.status == 409 and received is not None and conflicts < 5:
                conflicts += 1
                log(
                    "task_finish_conflict",
                    task=task_id,
                    received=received,
                    log_bytes=body["log_bytes"],
                )
                if output is not None and send is not None and output.acknowledge(received):
                    send()
                    continue
                self.stop.wait(TASK_BACKOFF_CAP_S * random.uniform(0.5, 1.0))
                continue
            log("task_finish_refused", task=task_id, status=answer.status)
            if answer.status in (401, 403):
                self.revoked_by(f"finish_{answer.status}")
            return

    def finished(self, task: Task, finish: dict[str, Any]) -> None:
        with self._lock:
            self._active.pop(task.id, None)
            self._finishes[task.id] = finish
            while len(self._finishes) > FINISHES_KEPT:
                self._finishes.popitem(last=False)

    def close(self) -> None:
        """Kill every running task (agent shutdown): containers with `docker kill`."""
        with self._lock:
            tasks = list(self._active.values())
        killers = []
        for task in tasks:
            task.cancel("agent_stopping")
            proc = task.proc
            if task.container:
                killer = threading.Thread(
                    target=_docker, args=(self.config.docker, "kill", task.container), daemon=True
                )
                killer.start()
                killers.append(killer)
            elif proc is not None:
                _kill_tree(proc)
        deadline = time.monotonic() + 2.5  # within the local provisioner's SIGTERM grace
        for killer in killers:
            killer.join(max(0.0, deadline - time.monotonic()))


def main() -> int:
    try:
        config = load_config(os.environ)
        context = tls_context(config.ca_file)
    except ConfigError as exc:
        log("config_error", error=str(exc))
        return 2
    runner = ScriptRunner(config.shell)
    try:
        server = AgentServer(config, runner)
    except OSError as exc:
        log("bind_failed", host=config.host, port=config.port, error=str(exc))
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log("signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    serving = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    serving.start()
    advertise = config.advertise_host
    url_host = f"[{advertise}]" if ":" in advertise else advertise
    agent_url = f"http://{url_host}:{server.port}"
    log("listening", worker=config.worker_id, pool=config.pool, agent_url=agent_url)
    code = 0
    tasks: TaskAgent | None = None
    try:
        answer = report_ready(config, agent_url, stop, context)
        if answer is not None:
            server.set_access_token(answer.access_token)
            log("ready", worker=config.worker_id)
            if answer.worker_token is None:
                log("tasks_disabled", reason="no worker_token in the ready answer")
            else:
                client = ServiceClient(config, answer.worker_token, context, stop)
                tasks = TaskAgent(config, client, stop)
                threading.Thread(target=tasks.poll_forever, name="poll", daemon=True).start()
            while not stop.wait(1.0):
                pass
        elif not stop.is_set():
            code = 1
    finally:
        server.shutdown()
        server.server_close()
        runner.close()
        if tasks is not None:
            tasks.close()
    log("stopped", exit_code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
