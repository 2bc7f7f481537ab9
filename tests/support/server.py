"""A real ``workerlease serve`` as a subprocess, for end-to-end tests.

:class:`ServerProcess` writes a config YAML into a temporary directory (SQLite
there too, a unique ``deployment_id``, the local provisioner's ``work_root`` in
a directory of its own that workers under their own uids can reach (see
:func:`worker_root`), ``scheduler.interval: 1s``), starts ``workerlease serve`` on a free
127.0.0.1 port in a session of its own with the admin token in the
environment, and waits for ``/readyz``. ``stop()`` SIGTERMs it (SIGKILL of the
process group if it hangs) and reaps it; ``kill()`` SIGKILLs the whole process
group (gunicorn master, web worker, scheduler). ``close()`` also kills every
local agent process left with the deployment id (scanning ``/proc``, skipping
zombies) and reaps what it can, so nothing leaks between tests.

The test process is made a child subreaper (Linux ``prctl``): agents and the
scheduler orphaned by a stopped or killed server are re-parented to it instead
of to PID 1, which on these machines never reaps, and are waited for here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests
import yaml

ADMIN_TOKEN = "it-admin-token-0123456789abcdef"
PR_SET_CHILD_SUBREAPER = 36
T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def worker_root(prefix: str = "workerlease-it-") -> Path:
    """A new, empty directory for a local pool's ``work_root`` that workers under uids of
    their own can reach: under the system temp dir, searchable (0711), not listable.

    pytest's ``tmp_path`` cannot serve: it lies under ``pytest-of-root`` (0700), which the
    local provisioner refuses when it isolates workers. The caller removes it."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    return path


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.2,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"after {timeout}s: {text}")
        time.sleep(interval)


def become_subreaper() -> None:
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


# ---- /proc ---------------------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    state: str


def proc_info(pid: int) -> ProcInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return ProcInfo(pid, int(fields[1]), int(fields[2]), fields[0])


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, _, value = item.decode(errors="replace").partition("=")
        env.setdefault(key, value)
    return env


def local_processes(deployment_id: str, agents_only: bool = True) -> dict[int, str]:
    """Live (non-zombie) processes of local workers of the deployment: pid -> worker id."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        env = _environ(pid)
        if (
            env.get("WORKERLEASE_PROVISIONER") != "local"
            or env.get("WORKERLEASE_DEPLOYMENT") != deployment_id
        ):
            continue
        info = proc_info(pid)
        if info is None or info.state in ("Z", "X"):
            continue
        if agents_only:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if not any(arg.endswith(b"workerlease_agent.py") for arg in cmdline[1:]):
                continue
        found[pid] = env.get("WORKERLEASE_WORKER_ID", "")
    return found


def reap_zombie_children(select: Callable[[ProcInfo], bool]) -> int:
    """waitpid() our own zombie children that ``select`` picks; return how many."""
    me = os.getpid()
    reaped = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        info = proc_info(int(entry))
        if info is None or info.ppid != me or info.state != "Z" or not select(info):
            continue
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.pid, os.WNOHANG)
            reaped += 1
    return reaped


# ---- the server ----------------------------------------------------------------


def pool(name: str = "hosted-ubuntu", **overrides: Any) -> dict[str, Any]:
    """A local pool; ``work_root`` is filled in by the server."""
    entry: dict[str, Any] = {
        "name": name,
        "os": "ubuntu",
        "provisioner": "local",
        "description": "test pool",
        "min_ready": 1,
        "max_workers": 4,
        "lease_idle_timeout": "60m",
        "lease_max_lifetime": "72h",
        "provision_timeout": "2m",
        "pending_timeout": "30m",
        "capabilities": ["execution-containers"],
    }
    entry.update(overrides)
    return entry


class ServerProcess:
    """One ``workerlease serve`` subprocess with its own database, port and deployment id."""

    def __init__(
        self,
        tmp_path: Path,
        pools: list[dict[str, Any]] | None = None,
        scheduler: dict[str, Any] | None = None,
        admin_token: str | None = ADMIN_TOKEN,
        extra: dict[str, Any] | None = None,
        port: int | None = None,
        deployment_id: str | None = None,
        work_root: Path | None = None,
        connections: int | None = None,  # None: serve's own default
        host: str = "127.0.0.1",  # "0.0.0.0" for docker pools' bridge (see provisioners/docker)
        serve_args: list[str] | None = None,  # more ``serve`` options (--workers 2, ...)
    ) -> None:
        # ``deployment_id`` / ``work_root``: shared by several replicas of one deployment
        # (each ServerProcess then is one replica; ``extra`` can point them at one database).
        self.dir = tmp_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.deployment_id = deployment_id or f"it-{uuid.uuid4().hex[:16]}"
        self.work_root = work_root or worker_root() / "workers"
        self._own_work_root = work_root is None
        self.connections = connections
        self.host = host
        self.serve_args = list(serve_args or [])
        self.db_path = tmp_path / "workerlease.db"
        self.config_path = tmp_path / "workerlease.yaml"
        self.log_path = tmp_path / "serve.log"
        self.admin_token = admin_token
        self.process: subprocess.Popen[bytes] | None = None
        self.seen_agent_pids: set[int] = set()
        self._pgids: set[int] = set()
        self.http = requests.Session()
        config: dict[str, Any] = {
            "database_url": f"sqlite:///{self.db_path}",
            "deployment_id": self.deployment_id,
            "scheduler": {"interval": "1s", **(scheduler or {})},
            "pools": [self._with_work_root(p) for p in (pools or [pool()])],
        }
        config.update(extra or {})
        self.config = config
        self.write_config()

    def _with_work_root(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry = dict(entry)
        if entry.get("provisioner", "local") == "local":
            entry["options"] = {"work_root": str(self.work_root), **entry.get("options", {})}
        return entry

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    # -- lifecycle -------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERLEASE_")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if self.admin_token:
            env["WORKERLEASE_ADMIN_TOKEN"] = self.admin_token
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--config",
            str(self.config_path),
            "--host",
            self.host,
            "--port",
            str(self.port),
            *(["--connections", str(self.connections)] if self.connections else []),
            *self.serve_args,
        ]

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start ``serve`` without waiting for it."""
        assert self.process is None or self.process.poll() is not None, "already running"
        become_subreaper()
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(),
                env=self.env(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._pgids.add(self.process.pid)
        return self.process

    def start(self, timeout: float = 90.0) -> ServerProcess:
        """Spawn and wait for ``/readyz``; ``timeout`` bounds a hang (gunicorn's boot on a
        loaded 2-core machine took well over the second it takes on an idle one)."""
        process = self.spawn()

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"serve exited with {process.returncode}:\n{self.log_tail()}")
            try:
                return requests.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(ready, timeout, message=lambda: f"/readyz never 200:\n{self.log_tail()}")
        self._pgids |= self._child_groups(process.pid)  # the scheduler's own session
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait (SIGKILL the group after ``timeout``); return the exit code."""
        process = self.process
        if process is None:
            return None
        self.http.close()
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._killpg(process.pid)
                process.wait(10)
        self._reap_group()
        return process.returncode

    def kill(self) -> None:
        """SIGKILL all of the service at once and reap it.

        That is the process group started here (gunicorn master and web worker) and the
        group of every other child of the master (the scheduler, which runs in a session
        of its own): a crash of the whole service, as a cgroup kill would do it.
        """
        process = self.process
        assert process is not None
        groups = {process.pid} | self._child_groups(process.pid)
        self._pgids |= groups
        for pgid in groups:
            self._killpg(pgid)
        process.wait(10)
        self._reap_group()

    @staticmethod
    def _child_groups(pid: int) -> set[int]:
        """Process groups of ``pid``'s children (not ours, not session-less)."""
        own = os.getpgrp()
        return {
            info.pgid
            for info in map(proc_info, process_ids())
            if info is not None and info.ppid == pid and info.pgid not in (own, 0, 1)
        }

    @staticmethod
    def _killpg(pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def _reap_group(self) -> None:
        """Wait for the groups' other processes (re-parented to us) to exit, and reap them."""
        for pgid in self._pgids:

            def in_group(info: ProcInfo, group: int = pgid) -> bool:
                return info.pgid == group

            deadline = time.monotonic() + 15
            while any(
                i.state not in ("Z", "X")
                for i in map(proc_info, process_ids())
                if i is not None and i.pgid == pgid
            ):
                if time.monotonic() >= deadline:
                    self._killpg(pgid)
                    time.sleep(0.2)
                    break
                reap_zombie_children(in_group)
                time.sleep(0.1)
            reap_zombie_children(in_group)
        # Forget them: a group id is a pid, and pids wrap (pid_max is 32768 here and a
        # busy machine went round in minutes). Kept, a later stop() would wait on, then
        # SIGKILL, whatever new session (another test's agent) got the number.
        self._pgids.clear()

    def close(self) -> None:
        """Stop the server, then kill and reap every agent left with our deployment id."""
        with contextlib.suppress(Exception):
            self.stop()
        self.kill_agents()
        if self._own_work_root:
            shutil.rmtree(self.work_root.parent, ignore_errors=True)

    def kill_agents(self) -> None:
        for _ in range(3):
            procs = local_processes(self.deployment_id, agents_only=False)
            self.seen_agent_pids |= set(procs)
            if not procs:
                break
            for pid in procs:
                info = proc_info(pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if info is not None and info.pgid == pid:
                        os.killpg(pid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        self._reap_agents()

    def _reap_agents(self) -> None:
        seen = self.seen_agent_pids
        reap_zombie_children(lambda info: info.pid in seen or info.pgid in seen)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- observation -----------------------------------------------------------------

    def agents(self) -> dict[str, int]:
        """Live agent processes of this deployment: worker id -> pid."""
        procs = local_processes(self.deployment_id)
        self.seen_agent_pids |= set(procs)
        self._reap_agents()
        return {worker_id: pid for pid, worker_id in procs.items()}

    def workdir(self, worker_id: str) -> Path:
        return self.work_root / self.deployment_id / worker_id

    # -- HTTP ------------------------------------------------------------------------

    def request(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        kwargs.setdefault("timeout", 30)
        return self.http.request(method, f"{self.url}{path}", headers=headers, **kwargs)

    def admin(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        assert self.admin_token
        return self.request(method, path, token=self.admin_token, **kwargs)

    def create_tenant(self, name: str) -> dict[str, Any]:
        response = self.admin("POST", "/v1/admin/tenants", json={"name": name})
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    def pool_counts(self, name: str = "hosted-ubuntu") -> dict[str, int]:
        response = self.admin("GET", "/v1/admin/pools")
        assert response.status_code == 200, response.text
        for entry in response.json()["pools"]:
            if entry["name"] == name:
                counts: dict[str, int] = entry["counts"]
                return counts
        raise AssertionError(f"no pool {name}")

    def workers(self, state: str = "all", pool: str | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"state": state, "limit": 500}
        if pool:
            params["pool"] = pool
        response = self.admin("GET", "/v1/admin/workers", params=params)
        assert response.status_code == 200, response.text
        workers: list[dict[str, Any]] = response.json()["workers"]
        return workers

    def wait_ready_workers(
        self, at_least: int, pool: str = "hosted-ubuntu", timeout: float = 90.0
    ) -> dict[str, int]:
        def enough() -> dict[str, int] | None:
            counts = self.pool_counts(pool)
            return counts if counts["ready"] >= at_least else None

        return wait_until(
            enough,
            timeout,
            message=lambda: (
                f"pool {pool} never had {at_least} ready: "
                f"{self.pool_counts(pool)}\n{self.log_tail()}"
            ),
        )


def process_ids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)
