"""The worker agent, run as a real process against a fake service on 127.0.0.1.

Set WORKERLEASE_AGENT_TEST_PYTHON to run the agent under another interpreter
(it must keep working on Python 3.9).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from images.agent import workerlease_agent as agent_module

AGENT = Path(__file__).resolve().parents[2] / "images" / "agent" / "workerlease_agent.py"
PYTHON = os.environ.get("WORKERLEASE_AGENT_TEST_PYTHON") or sys.executable
BOOTSTRAP = "bootstrap-secret-4f1c"
ACCESS = "access-secret-9a7e"
WORKER = f"w-{uuid.uuid4().hex[:8]}"
# Bounds a hang only, never a slow machine: an agent's start or exit takes well under a
# second on an idle machine and several on a loaded one.
WAIT_S = 60.0
# The scripts below that must not hold the answer run ``sleep 300``: only an answer held
# until then breaks this bound (the request itself waits longer, so it is what fails).
HELD_S = 120.0


@dataclass
class ReadyCall:
    path: str
    authorization: str | None
    body: dict[str, Any]


@dataclass
class FakeService:
    """Records ready callbacks; answers them from ``responses`` (then 200 + token)."""

    url: str = ""
    calls: list[ReadyCall] = field(default_factory=list)
    responses: list[int] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    received: threading.Event = field(default_factory=threading.Event)

    def answer(self, call: ReadyCall) -> tuple[int, dict[str, Any]]:
        self.calls.append(call)
        self.received.set()
        status = self.responses.pop(0) if self.responses else 200
        if status != 200:
            return status, {"error": "fake"}
        self.release.wait(30)
        return 200, {"access_token": ACCESS}


@contextlib.contextmanager
def serving(fake: FakeService, tls: ssl.SSLContext | None = None) -> Iterator[FakeService]:
    """Run ``fake`` on 127.0.0.1 (over TLS with ``tls``) and set its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            call = ReadyCall(self.path, self.headers.get("Authorization"), json.loads(body))
            status, payload = fake.answer(call)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    scheme = "http"
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    fake.url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def service() -> Iterator[FakeService]:
    fake = FakeService()
    fake.release.set()
    with serving(fake):
        yield fake


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    log_path: Path
    workdir: Path
    url: str = ""

    def log(self) -> str:
        return self.log_path.read_text()

    def run(self, body: Any, token: str | None = ACCESS, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        if not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        kwargs.setdefault("timeout", 30)
        return requests.post(f"{self.url}/run", data=body, headers=headers, **kwargs)


def wait_for(predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s")
        time.sleep(0.05)


@pytest.fixture
def start_agent(service: FakeService, tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    started: list[Agent] = []

    def start(wait_ready: bool = True, **env: str) -> Agent:
        workdir = tmp_path / f"agent{len(started)}"
        workdir.mkdir()
        log_path = workdir / "agent.log"
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "WORKERLEASE_URL": service.url,
            "WORKERLEASE_WORKER_ID": WORKER,
            "WORKERLEASE_DEPLOYMENT": "dep-test",
            "WORKERLEASE_POOL": "pool-a",
            "WORKERLEASE_BOOTSTRAP_TOKEN": BOOTSTRAP,
            "WORKERLEASE_AGENT_PORT": "0",
            **env,
        }
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [PYTHON, str(AGENT)],
                cwd=workdir,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        agent = Agent(proc, log_path, workdir)
        started.append(agent)
        if wait_ready:
            wait_for(lambda: bool(service.calls) or proc.poll() is not None)
            assert service.calls, agent.log()
            agent.url = service.calls[-1].body["agent_url"]
            wait_for(lambda: "event=ready" in agent.log())
        return agent

    yield start
    for agent in started:
        if agent.proc.poll() is None:
            os.killpg(agent.proc.pid, signal.SIGKILL)
        agent.proc.wait(10)


def test_ready_callback_reports_the_bound_port_with_the_bootstrap_token(
    service: FakeService, start_agent: Callable[..., Agent]
) -> None:
    agent = start_agent()

    [call] = service.calls
    assert call.path == f"/v1/workers/{WORKER}/ready"
    assert call.authorization == f"Bearer {BOOTSTRAP}"
    assert call.body["address"] == "127.0.0.1"
    host, port = call.body["agent_url"].removeprefix("http://").split(":")
    assert host == "127.0.0.1" and int(port) > 0
    assert requests.get(f"{agent.url}/healthz", timeout=5).status_code == 200


def test_advertise_host_is_used_in_agent_url(
    service: FakeService, start_agent: Callable[..., Agent]
) -> None:
    start_agent(WORKERLEASE_AGENT_HOST="0.0.0.0", WORKERLEASE_AGENT_ADVERTISE_HOST="localhost")

    assert service.calls[0].body["address"] == "localhost"
    assert service.calls[0].body["agent_url"].startswith("http://localhost:")


def test_run_returns_output_and_exit_code_in_the_agent_directory(
    start_agent: Callable[..., Agent],
) -> None:
    agent = start_agent()

    response = agent.run({"script": "echo hello; echo oops >&2; pwd; exit 3", "timeout_s": 10})

    assert response.status_code == 200
    result = response.json()
    assert result["exit_code"] == 3
    assert result["stdout"] == f"hello\n{agent.workdir.resolve()}\n"
    assert result["stderr"] == "oops\n"
    assert result["timed_out"] is False


def test_script_reading_stdin_does_not_swallow_the_rest_of_the_script(
    start_agent: Callable[..., Agent],
) -> None:
    agent = start_agent()

    result = agent.run({"script": "cat\necho after\n"}).json()

    assert result["stdout"] == "after\n"


def test_background_child_does_not_hold_the_answer(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent()
    started = time.monotonic()

    result = agent.run({"script": "sleep 300 &\necho $!"}, timeout=HELD_S + 60).json()

    child = int(result["stdout"])
    try:
        assert time.monotonic() - started < HELD_S
        assert result["exit_code"] == 0
    finally:
        os.kill(child, signal.SIGKILL)


def test_wrong_or_missing_token_is_401(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent()

    wrong = agent.run({"script": "touch ran"}, token="nope")
    missing = agent.run({"script": "touch ran"}, token=None)
    bootstrap = agent.run({"script": "touch ran"}, token=BOOTSTRAP)

    assert [r.status_code for r in (wrong, missing, bootstrap)] == [401, 401, 401]
    assert "error" in wrong.json()
    assert not (agent.workdir / "ran").exists()


def test_run_before_the_access_token_is_known_is_503(
    service: FakeService, start_agent: Callable[..., Agent]
) -> None:
    service.release.clear()  # hold the ready callback's answer
    agent = start_agent(wait_ready=False)
    assert service.received.wait(WAIT_S), agent.log()
    agent.url = service.calls[0].body["agent_url"]

    assert requests.get(f"{agent.url}/healthz", timeout=5).status_code == 200
    assert agent.run({"script": "true"}).status_code == 503

    service.release.set()
    wait_for(lambda: "event=ready" in agent.log())
    assert agent.run({"script": "true"}).status_code == 200


def test_a_ready_answer_slower_than_other_calls_is_waited_for(
    service: FakeService, start_agent: Callable[..., Agent]
) -> None:
    """The service spends the bootstrap token on the first ready call: an agent that gave
    up on a slow answer and asked again would be refused (401) and its worker lost, as a
    loaded service answering in 11 s once did to leased workers."""
    service.release.clear()  # hold the ready callback's answer
    agent = start_agent(wait_ready=False)
    assert service.received.wait(WAIT_S), agent.log()
    time.sleep(agent_module.CALLBACK_TIMEOUT_S + 2)  # past what the other calls wait

    service.release.set()
    wait_for(lambda: "event=ready " in agent.log())
    assert len(service.calls) == 1
    assert "event=ready_retry" not in agent.log()


def test_timeout_kills_the_script_and_its_children(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent()
    started = time.monotonic()

    result = agent.run(
        {"script": "sleep 300 &\necho $! > child.pid\nsleep 300", "timeout_s": 1},
        timeout=HELD_S + 60,
    )

    assert time.monotonic() - started < HELD_S  # the 1 s timeout worked, not the sleep
    assert result.json() == {"exit_code": -1, "stdout": "", "stderr": "", "timed_out": True}
    child = int((agent.workdir / "child.pid").read_text())
    wait_for(lambda: not _alive(child))


def _alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (PID 1 here may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        json.dumps({"timeout_s": 5}),
        json.dumps({"script": 7}),
        json.dumps({"script": "true", "timeout_s": 0}),
        json.dumps({"script": "true", "timeout_s": 3601}),
        json.dumps({"script": "true", "timeout_s": "5"}),
        json.dumps({"script": "true", "timeot_s": 5}),
    ],
)
def test_bad_request_is_400(start_agent: Callable[..., Agent], body: bytes | str) -> None:
    agent = start_agent()

    response = agent.run(body)

    assert response.status_code == 400
    assert "error" in response.json()


def test_oversize_body_is_413(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent()

    response = agent.run({"script": "#" * (1 << 20)})

    assert response.status_code == 413


def test_output_is_capped(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent()

    result = agent.run({"script": "head -c 1100000 /dev/zero | tr '\\0' a"}).json()

    assert result["stdout"] == "a" * (1 << 20) + "\n[truncated]"


def test_unknown_path_is_404(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent()

    assert requests.get(f"{agent.url}/nope", timeout=5).status_code == 404
    assert requests.post(f"{agent.url}/nope", data=b"{}", timeout=5).status_code == 404


def test_scripts_do_not_see_the_tokens(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent()

    env = agent.run({"script": "env"}).json()["stdout"]

    assert f"WORKERLEASE_WORKER_ID={WORKER}" in env
    assert "TOKEN" not in env
    assert BOOTSTRAP not in env and ACCESS not in env
    assert BOOTSTRAP not in agent.log() and ACCESS not in agent.log()


def test_sigterm_exits_0(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent()

    agent.proc.send_signal(signal.SIGTERM)

    assert agent.proc.wait(WAIT_S) == 0, agent.log()
    assert "event=stopped" in agent.log()


def test_ready_callback_is_retried_after_5xx(
    service: FakeService, start_agent: Callable[..., Agent]
) -> None:
    service.responses = [503, 500]

    agent = start_agent()
    wait_for(lambda: len(service.calls) == 3)

    assert agent.run({"script": "true"}).status_code == 200
    assert agent.log().count("event=ready_retry") == 2


@pytest.mark.parametrize("status", [401, 404, 409])
def test_refused_ready_callback_exits_1(
    service: FakeService, start_agent: Callable[..., Agent], status: int
) -> None:
    service.responses = [status]

    agent = start_agent(wait_ready=False)

    assert agent.proc.wait(WAIT_S) == 1, agent.log()
    assert len(service.calls) == 1
    assert f"event=ready_refused status={status}" in agent.log()


def test_unreachable_service_gives_up_after_the_ready_timeout(
    start_agent: Callable[..., Agent],
) -> None:
    agent = start_agent(
        wait_ready=False,
        WORKERLEASE_URL="http://127.0.0.1:9",  # discard port: nothing listens
        WORKERLEASE_READY_TIMEOUT_S="2",
    )

    assert agent.proc.wait(WAIT_S) == 1, agent.log()
    assert "event=ready_gave_up" in agent.log()


def test_access_token_from_the_environment_wins(
    service: FakeService, start_agent: Callable[..., Agent]
) -> None:
    agent = start_agent(WORKERLEASE_ACCESS_TOKEN="operator-token")

    assert agent.run({"script": "true"}).status_code == 401
    assert agent.run({"script": "true"}, token="operator-token").status_code == 200


# --- finding 8: nothing unauthenticated is read or revealed; bounded connections --------


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=WAIT_S)
    sock.settimeout(WAIT_S)  # bounds a hang only
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the agent sends until it closes the connection."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        except TimeoutError:
            raise AssertionError(f"connection still open after {WAIT_S}s: {received!r}") from None
        if not chunk:
            return received
        received += chunk


def _status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1."), answer
    return int(answer.split(b" ", 2)[1])


def test_healthz_reveals_nothing_about_the_worker(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent()

    health = requests.get(f"{agent.url}/healthz", timeout=5)

    assert health.status_code == 200
    assert health.json() == {"status": "ok"}


@pytest.mark.parametrize("length", [1 << 20, 100 << 20])
@pytest.mark.parametrize("token", ["nope", None])
def test_unauthenticated_body_is_refused_unread(
    start_agent: Callable[..., Agent], length: int, token: str | None
) -> None:
    agent = start_agent()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""

    with _connect(agent.url) as sock:
        # Headers only: an agent that reads the body before the token waits for it.
        sock.sendall(
            f"POST /run HTTP/1.1\r\nHost: agent\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n".encode()
        )
        answer = _read_until_closed(sock)  # returns once the agent has closed

    assert _status(answer) == 401
    assert not (agent.workdir / "ran").exists()


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 200_000,
        b'{"script": ' + b"[" * 200_000,
        b'{"script": "true", "x": ' + b'{"a": ' * 100_000,
    ],
)
def test_deeply_nested_json_is_400_not_a_traceback(
    start_agent: Callable[..., Agent], body: bytes
) -> None:
    agent = start_agent()

    response = agent.run(body)

    assert response.status_code == 400
    assert "nested" in response.json()["error"]
    assert "Traceback" not in agent.log()
    assert agent.run({"script": "true"}).status_code == 200


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_connections_beyond_the_limit_are_refused_without_a_thread(
    start_agent: Callable[..., Agent],
) -> None:
    agent = start_agent(WORKERLEASE_AGENT_MAX_CONNECTIONS="2")
    idle_threads = _threads(agent.proc.pid)

    # Connections are accepted in order: the first two take the slots and hold them by
    # sending nothing; every later one is answered 503 and closed, with no thread of its own.
    holders = [_connect(agent.url) for _ in range(2)]
    try:
        refused = [_connect(agent.url) for _ in range(8)]
        answers = []
        for sock in refused:
            with sock:
                answers.append(_read_until_closed(sock))
        assert [_status(a) for a in answers] == [503] * 8
        assert _threads(agent.proc.pid) <= idle_threads + 2
        wait_for(lambda: "event=connections_refused" in agent.log())
    finally:
        for sock in holders:
            sock.close()

    # The slots come back once the holders have gone.
    wait_for(lambda: _healthz_status(agent.url) == 200)
    assert agent.run({"script": "true"}).status_code == 200


def _healthz_status(url: str) -> int:
    with _connect(url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: agent\r\n\r\n")
        return _status(_read_until_closed(sock))


def test_a_request_trickling_in_is_cut_at_the_request_timeout(
    start_agent: Callable[..., Agent],
) -> None:
    agent = start_agent(WORKERLEASE_AGENT_REQUEST_TIMEOUT_S="2")

    # One byte every 0.2 s: never idle long enough for a per-read socket timeout.
    with _connect(agent.url) as sock:
        sock.sendall(f"POST /run HTTP/1.1\r\nAuthorization: Bearer {ACCESS}\r\nX-Slow: ".encode())
        deadline = time.monotonic() + WAIT_S
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                sock.sendall(b"a")
                readable, _, _ = select.select([sock], [], [], 0.2)
                closed = bool(readable) and not sock.recv(65536)
            except (BrokenPipeError, ConnectionResetError):
                closed = True

    assert closed, "the agent kept reading a request that trickled in for the whole bound"
    wait_for(lambda: "event=request_timed_out" in agent.log())
    assert agent.run({"script": "true"}).status_code == 200


# --- finding 11a: the ready callback over verified TLS ----------------------------------


@dataclass
class Pki:
    ca_file: Path
    server: ssl.SSLContext  # presents a certificate for 127.0.0.1
    wrong_host: ssl.SSLContext  # the same CA's certificate for another name


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _server_context(
    directory: Path,
    name: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    san: x509.GeneralName,
) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A throwaway CA and two server certificates it signed."""
    directory = tmp_path / "pki"
    directory.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("workerlease test CA"))
        .issuer_name(_name("workerlease test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    return Pki(
        ca_file=ca_file,
        server=_server_context(directory, "loopback", ca_key, ca, loopback),
        wrong_host=_server_context(
            directory, "elsewhere", ca_key, ca, x509.DNSName("elsewhere.example")
        ),
    )


def test_ready_callback_over_https_with_the_ca_file(
    pki: Pki, start_agent: Callable[..., Agent]
) -> None:
    tls = FakeService()
    tls.release.set()
    with serving(tls, pki.server):
        agent = start_agent(
            wait_ready=False, WORKERLEASE_URL=tls.url, WORKERLEASE_CA_FILE=str(pki.ca_file)
        )
        wait_for(lambda: "event=ready " in agent.log() or agent.proc.poll() is not None)

        [call] = tls.calls
        assert call.authorization == f"Bearer {BOOTSTRAP}"
        agent.url = call.body["agent_url"]
        assert agent.run({"script": "true"}).status_code == 200


@pytest.mark.parametrize("case", ["without the CA file", "certificate for another host"])
def test_ready_callback_refuses_an_unverified_service(
    pki: Pki, start_agent: Callable[..., Agent], case: str
) -> None:
    tls = FakeService()
    tls.release.set()
    wrong_host = case == "certificate for another host"
    env = {"WORKERLEASE_CA_FILE": str(pki.ca_file)} if wrong_host else {}
    with serving(tls, pki.wrong_host if wrong_host else pki.server):
        agent = start_agent(wait_ready=False, WORKERLEASE_URL=tls.url, **env)

        assert agent.proc.wait(WAIT_S) == 1, agent.log()

    assert tls.calls == []  # the bootstrap token never went out
    assert "event=ready_refused reason=certificate" in agent.log()
    assert "certificate verify failed" in agent.log()
    assert BOOTSTRAP not in agent.log()


def test_unreadable_ca_file_is_a_configuration_error(
    start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    not_pem = tmp_path / "not-a-ca.pem"
    not_pem.write_text("not a certificate\n")

    agent = start_agent(wait_ready=False, WORKERLEASE_CA_FILE=str(not_pem))

    assert agent.proc.wait(WAIT_S) == 2, agent.log()
    assert "event=config_error" in agent.log() and "WORKERLEASE_CA_FILE" in agent.log()
