#!/usr/bin/env python3
"""workerlease worker agent: reports a worker ready and runs tenants' scripts.

Standard library only, Python 3.9+: this one file is copied into Docker images,
EC2 user data and Packer templates. See README.md beside it for the protocol.

Lifecycle: bind the HTTP server (port 0 lets the OS pick), call
``POST {WORKERLEASE_URL}/v1/workers/{id}/ready`` with the one-time bootstrap
token and the address actually bound, take the access token from the answer,
then serve ``GET /healthz`` and ``POST /run`` until SIGTERM (exit 0).
Exit 1 when the service refuses the worker or stays unreachable; exit 2 on a
configuration error.
"""

from __future__ import annotations

import contextlib
import hmac
import http.client
import json
import os
import random
import shlex
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
from collections.abc import MutableMapping
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
    )


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


def report_ready(
    config: Config, agent_url: str, stop: threading.Event, context: ssl.SSLContext
) -> str | None:
    """Call the ready callback until it answers; return the access token or None.

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
    attempt = 0
    while not stop.is_set():
        attempt += 1
        request = urllib.request.Request(url, data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        request.add_header("Authorization", f"Bearer {config.bootstrap_token}")
        try:
            with opener.open(request, timeout=CALLBACK_TIMEOUT_S) as response:
                answer = response.read(MAX_BODY)
            return _access_token_from(answer, config)
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code not in RETRYABLE_4XX:
                log("ready_refused", status=exc.code, attempt=attempt)
                return None
            reason = f"http_{exc.code}"
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            certificate = _certificate_error(exc)
            if certificate is not None:
                log("ready_refused", reason="certificate", error=certificate, attempt=attempt)
                return None
            reason = type(exc).__name__
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            log("ready_gave_up", attempts=attempt, reason=reason)
            return None
        pause = min(delay * random.uniform(0.5, 1.0), remaining)
        log("ready_retry", attempt=attempt, reason=reason, retry_in_s=round(pause, 2))
        stop.wait(pause)
        delay = min(delay * 2, BACKOFF_CAP_S)
    return None


def _access_token_from(answer: bytes, config: Config) -> str | None:
    if config.access_token:
        return config.access_token  # an operator-given token wins over the service's
    try:
        token = json.loads(answer).get("access_token")
    except (ValueError, AttributeError):
        token = None
    if not isinstance(token, str) or not token:
        log("ready_bad_answer")
        return None
    return token


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
    try:
        token = report_ready(config, agent_url, stop, context)
        if token is not None:
            server.set_access_token(token)
            log("ready", worker=config.worker_id)
            while not stop.wait(1.0):
                pass
        elif not stop.is_set():
            code = 1
    finally:
        server.shutdown()
        server.server_close()
        runner.close()
    log("stopped", exit_code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
