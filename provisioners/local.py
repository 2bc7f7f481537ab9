"""The ``local`` provisioner: a worker is the agent process on the service host.

For development, tests and single-host demos. When the service runs as root, each
worker runs under a numeric uid and gid of its own (``provisioners/local_uids.py``
says how they are picked), in a ``0700`` work directory owned by that uid, with an
environment of only what the agent needs: its scripts cannot signal, trace or read
another worker or the service (``/proc/PID/environ`` is readable by its own uid
only). Without root the workers run under the service's own uid and share all it
can reach: :attr:`LocalProvisioner.isolated` is False and a warning says so.

Ownership lives in each process's environment, read back from
``/proc/PID/environ`` (so Linux only): the agent is started with
``WORKERLEASE_PROVISIONER=local`` and the ``WORKERLEASE_DEPLOYMENT`` /
``WORKERLEASE_POOL`` / ``WORKERLEASE_WORKER_ID`` it is configured by, and every
process its scripts start inherits them. The marker keeps agents of Docker
containers, also visible in the host's ``/proc``, from being taken for local ones.
A script that scrubs its environment *and* leaves its process group escapes
``destroy``, unless the worker has a uid of its own: then ``destroy`` also kills
every process holding the uid of the worker's live processes. Use the docker or
ec2 provisioner where a tenant must not see the host at all.

A pool with the ``execution-containers`` capability gives its workers the host's
Docker engine: the group of the engine's socket becomes a supplementary group of
the worker's uid. Access to the engine is root on the host (``docker run -v /:/host``),
so such a pool gives up the isolation above, and its :attr:`warning` says so from its
first worker on. The group, rather than running the agent as root, keeps the rest as
it is: own uid, private directory, no ordinary access to the service's files; what a
tenant then does with the engine is the risk the warning names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

import images.agent
from provisioners import local_uids
from provisioners.base import (
    EXECUTION_CONTAINERS,
    CapacityError,
    PermanentProvisionerError,
    Provisioner,
    ProvisionerOptions,
    ResourceState,
    TransientProvisionerError,
    WorkerHandle,
    WorkerSpec,
)

log = logging.getLogger(__name__)

AGENT_FILE = Path(images.agent.__file__).resolve().parent / "workerlease_agent.py"
MARKER = "WORKERLEASE_PROVISIONER"
MARKER_VALUE = "local"
ENV_WORKER = "WORKERLEASE_WORKER_ID"
ENV_DEPLOYMENT = "WORKERLEASE_DEPLOYMENT"
ENV_INSTALLATION = "WORKERLEASE_INSTALLATION"
ENV_POOL = "WORKERLEASE_POOL"
ENV_AGENT_HOST = "WORKERLEASE_AGENT_HOST"
TERM_GRACE_S = 3.0  # SIGTERM -> SIGKILL
KILL_GRACE_S = 2.0  # SIGKILL -> give up (transient error)
POLL_S = 0.05
LOCK_STRIPES = 64
UID_MAX = 2**31 - 2  # uids above are unsafe for 32-bit signed uid_t users (systemd's advice)
SYSTEM_PYTHONS = "/usr/local/bin:/usr/bin:/bin"
DOCKER_SOCKET = "/var/run/docker.sock"


class LocalOptions(ProvisionerOptions):
    #: Holds ``<deployment_id>/<worker_id>/`` per worker; default ``$TMPDIR/workerlease-workers``.
    work_root: str | None = None
    #: Interpreter that runs the agent; default: the service's own.
    python: str | None = None
    #: Address the agent binds and advertises.
    agent_host: str = "127.0.0.1"
    #: First uid (and gid) of the range workers run under when the service is root.
    #: Above login users (< 60000), systemd's dynamic users (61184-65519), ``nobody``
    #: and the first 29 subordinate-id blocks ``useradd`` hands out (100000 + 65536 n);
    #: no /etc/passwd entry is needed. Must not overlap ids the host uses otherwise.
    uid_range_start: int = Field(2_000_000, ge=65536)
    #: How many uids workers may use: the most workers running at once on the host.
    uid_range_size: int = Field(65536, ge=1)
    #: Refuse to start the pool rather than run workers under the service's uid.
    require_isolation: bool = False
    #: Extra agent settings, e.g. ``WORKERLEASE_CONTAINER_PULL: never`` on a host that
    #: reaches no registry (as for EC2 pools' ``agent_env``).
    agent_env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _range_fits(self) -> LocalOptions:
        if self.uid_range_start + self.uid_range_size - 1 > UID_MAX:
            raise ValueError(f"uid_range_start + uid_range_size - 1 must be <= {UID_MAX}")
        return self


@dataclass(frozen=True)
class _Proc:
    """A live process carrying the local marker, as read from /proc."""

    pid: int
    pgid: int
    env: dict[str, str]
    is_agent: bool
    uid: int | None  # real uid; None if it exited meanwhile or was not read (``_scan``)


class LocalProvisioner(Provisioner[LocalOptions]):
    name = "local"
    Options = LocalOptions
    #: One /proc scan and one wait serve the whole batch (see ``destroy_many``).
    destroy_batch_size = 32

    def __init__(self, pool: str, options: LocalOptions) -> None:
        super().__init__(pool, options)
        if not Path("/proc/self/environ").exists():
            raise PermanentProvisionerError("the local provisioner needs Linux /proc")
        default_root = Path(tempfile.gettempdir()) / "workerlease-workers"
        self.work_root = Path(options.work_root) if options.work_root else default_root
        self.agent_host = options.agent_host
        self.uid_range = range(
            options.uid_range_start, options.uid_range_start + options.uid_range_size
        )
        reason = local_uids.isolation_unavailable()
        #: True when each worker runs under a uid of its own (the service is root).
        self.isolated = reason is None
        self._not_isolated_reason = reason
        self.python = self._python_for_workers() if reason is None else self._not_isolated(reason)
        # Calls for one worker id are serialised; calls for different ids run in parallel.
        self._locks = [threading.Lock() for _ in range(LOCK_STRIPES)]
        # Agents this object started, by pid, with their worker id; reaped by ``_reap``.
        self._children: dict[int, tuple[subprocess.Popen[bytes], str]] = {}
        self._children_lock = threading.Lock()
        # Set by the first worker of an execution-containers pool: what the warning adds.
        self._engine_warning: str | None = None

    def create(self, spec: WorkerSpec) -> WorkerHandle:
        workdir = self.work_root / _component(spec.deployment_id) / _component(spec.worker_id)
        with self._lock_for(spec.worker_id):
            self._reap()
            started = self._own_agent(spec.worker_id)
            if started is not None:
                # Ours and still running: the /proc scan can miss an agent that has just
                # started (seen under load: a second create started a second agent).
                return WorkerHandle(
                    spec.worker_id, spec.pool, provider_id=str(started), address=self.agent_host
                )
            try:
                # One scan answers both questions below. Nearly every create is of a new
                # id with no process at all, and each further /proc scan read every
                # process's environment again (the busiest work of a refill burst).
                own = [
                    proc
                    for proc in _scan(with_uids=False)
                    if proc.env.get(ENV_WORKER) == spec.worker_id
                    and proc.env.get(ENV_DEPLOYMENT) == spec.deployment_id
                ]
                for proc in own:
                    if proc.is_agent:
                        return self._handle(proc)
                # Leftovers of an earlier agent of this id (its scripts' children) go first.
                # Without a marked process of the id there is none: a process that scrubbed
                # its environment is found only by the uid of one that did not.
                if own and self._kill_workers({spec.worker_id}, spec.deployment_id):
                    raise TransientProvisionerError(
                        f"leftovers of worker {spec.worker_id} survive SIGKILL"
                    )
                pid = self._start(spec, workdir)
            except OSError as exc:
                raise TransientProvisionerError(f"cannot start local agent: {exc}") from exc
        log.info(
            "local_agent_started worker=%s pool=%s pid=%d isolated=%s",
            spec.worker_id,
            spec.pool,
            pid,
            self.isolated,
        )
        return WorkerHandle(
            spec.worker_id, spec.pool, provider_id=str(pid), address=self.agent_host
        )

    def destroy(self, handle: WorkerHandle) -> None:
        error = self.destroy_many([handle])[handle.worker_id]
        if error is not None:
            raise error

    def destroy_many(self, handles: Iterable[WorkerHandle]) -> dict[str, Exception | None]:
        """Stop every process of the workers with one /proc scan and one wait for all.

        Destroying one by one scanned /proc several times per worker while it waited
        for each in turn; released workers come in bursts.
        """
        worker_ids = {handle.worker_id for handle in handles}
        results: dict[str, Exception | None] = {}
        with contextlib.ExitStack() as held:
            for lock in self._locks_for(worker_ids):
                held.enter_context(lock)
            try:
                survivors = self._kill_workers(worker_ids)
            except OSError as exc:
                error = TransientProvisionerError(f"cannot stop local workers: {exc}")
                return dict.fromkeys(worker_ids, error)
            for worker_id in worker_ids:
                results[worker_id] = self._finish_destroy(worker_id, survivors)
        return results

    def _finish_destroy(self, worker_id: str, survivors: set[str]) -> Exception | None:
        if worker_id in survivors:
            return TransientProvisionerError(f"processes of worker {worker_id} survive SIGKILL")
        try:
            for workdir in self.work_root.glob(f"*/{_glob_escape(_component(worker_id))}"):
                shutil.rmtree(workdir)
        except OSError as exc:
            return TransientProvisionerError(f"cannot remove the directory of {worker_id}: {exc}")
        log.info("local_agent_destroyed worker=%s", worker_id)
        return None

    def describe(self, handles: Iterable[WorkerHandle]) -> dict[str, ResourceState]:
        try:
            live = {p.env.get(ENV_WORKER) for p in _scan(with_uids=False) if p.is_agent}
        except OSError as exc:
            raise TransientProvisionerError(f"cannot scan /proc: {exc}") from exc
        # An exiting agent drops out of the scan (its environ is released) before it is a
        # zombie that can be reaped. Our own children count as running until they are
        # reaped, so GONE always means gone from /proc, never a zombie left behind.
        live |= self._reap()
        return {
            h.worker_id: ResourceState.RUNNING if h.worker_id in live else ResourceState.GONE
            for h in handles
        }

    def list_owned(self, deployment_id: str) -> list[WorkerHandle]:
        """Agents of the deployment, and leftovers (script children) of dead ones."""
        self._reap()
        try:
            procs = _scan()
        except OSError as exc:
            raise TransientProvisionerError(f"cannot scan /proc: {exc}") from exc
        found: dict[str, _Proc] = {}
        for proc in procs:
            worker_id = proc.env.get(ENV_WORKER)
            if not worker_id or proc.env.get(ENV_DEPLOYMENT) != deployment_id:
                continue
            if worker_id not in found or (proc.is_agent and not found[worker_id].is_agent):
                found[worker_id] = proc
        return [self._handle(proc) for proc in found.values()]

    # -- helpers -------------------------------------------------------------

    def _own_agent(self, worker_id: str) -> int | None:
        """The pid of a running agent this object started for ``worker_id``, if any."""
        with self._children_lock:
            for pid, (child, child_worker) in self._children.items():
                if child_worker == worker_id and child.poll() is None:
                    return pid
        return None

    def _lock_for(self, worker_id: str) -> threading.Lock:
        return self._locks[_stripe(worker_id)]

    def _locks_for(self, worker_ids: Iterable[str]) -> list[threading.Lock]:
        """The stripes of several ids, in one global order so two batches cannot deadlock."""
        return [self._locks[i] for i in sorted({_stripe(w) for w in worker_ids})]

    def _handle(self, proc: _Proc) -> WorkerHandle:
        return WorkerHandle(
            worker_id=proc.env.get(ENV_WORKER, ""),
            pool=proc.env.get(ENV_POOL, ""),
            provider_id=str(proc.pid),
            address=proc.env.get(ENV_AGENT_HOST) or self.agent_host,
            installation=proc.env.get(ENV_INSTALLATION) or None,
        )

    @property
    def warning(self) -> str | None:
        warnings = []
        if not self.isolated:
            warnings.append(
                f"local workers are not isolated ({self._not_isolated_reason}): they run "
                "under the service's uid and can read its environment, database and other "
                "workers; run the service as root, or use docker or ec2 pools for tenants"
            )
        if EXECUTION_CONTAINERS in self.capabilities:
            self._engine_access(self.capabilities)  # said at start, not at the first worker
        if self._engine_warning is not None:
            warnings.append(self._engine_warning)
        return "; ".join(warnings) or None

    def _engine_access(self, capabilities: Collection[str]) -> tuple[list[int], dict[str, str]]:
        """Supplementary groups and environment that let the worker's agent use the
        host's Docker engine, when its pool has the execution-containers capability."""
        if EXECUTION_CONTAINERS not in capabilities:
            return [], {}
        env = {"DOCKER_HOST": os.environ["DOCKER_HOST"]} if os.environ.get("DOCKER_HOST") else {}
        socket = _engine_socket()
        groups: list[int] = []
        if socket is None:
            where = f"the Docker engine at {env['DOCKER_HOST']}"
        else:
            where = f"the host's Docker engine ({socket})"
            try:
                groups = [socket.stat().st_gid]
            except OSError:
                self._note_engine(
                    f"pool {self.pool} has the execution-containers capability but there is "
                    f"no Docker engine socket at {socket}: its container tasks fail"
                )
                return [], env
        self._note_engine(
            f"POOL {self.pool} GIVES UP WORKER ISOLATION: it has the execution-containers "
            f"capability, so its workers can use {where}, and access to the engine is root "
            "on the host: a tenant can read the database, the service's key and every other "
            "worker. Use it for trusted tenants only; docker or ec2 pools keep tenants apart"
        )
        return groups, env

    def _note_engine(self, warning: str) -> None:
        if self._engine_warning != warning:
            self._engine_warning = warning
            log.warning("local_workers_container_engine pool=%s: %s", self.pool, warning)

    def _not_isolated(self, reason: str) -> str:
        """Refuse, or warn once for this pool; return the python the agents run with."""
        if self.options.require_isolation:
            raise PermanentProvisionerError(
                f"pool {self.pool}: require_isolation is set but workers cannot get uids "
                f"of their own: {reason}"
            )
        log.warning(
            "local_workers_not_isolated pool=%s reason=%s: every worker runs under the "
            "service's uid and can read its environment, database and other workers",
            self.pool,
            reason,
        )
        return self.options.python or sys.executable

    def _python_for_workers(self) -> str:
        """Check that worker uids can reach ``work_root``; return a python they can run:
        the configured one, else the service's, else the system's (the service's may
        live under a private home, as pyenv's does under /root)."""
        blocker = local_uids.unreachable_part(self.work_root.parent)
        if blocker is not None:
            raise PermanentProvisionerError(
                f"work_root {self.work_root}: {blocker} is not searchable by other users "
                "(o+x), so workers under their own uids could not reach their directories"
            )
        if self.options.python:
            candidates = [self.options.python]
        else:
            candidates = [sys.executable, shutil.which("python3", path=SYSTEM_PYTHONS) or ""]
        for candidate in filter(None, candidates):
            if local_uids.unreachable_part(Path(candidate), stat.S_IXOTH) is None:
                log.info(
                    "local_workers_isolated pool=%s uids=%d..%d python=%s",
                    self.pool,
                    self.uid_range.start,
                    self.uid_range.stop - 1,
                    candidate,
                )
                return candidate
        raise PermanentProvisionerError(
            f"no python that workers under their own uids can run among {candidates}; "
            "set the pool option 'python' to one that other users can execute"
        )

    def _start(self, spec: WorkerSpec, workdir: Path) -> int:
        """A fresh work directory and the agent in it, under a free uid when isolated.

        The uid is picked and the agent started under it while holding the host-wide
        lock, so the next pick (of any service process on the host) sees it in /proc."""
        if not self.isolated:
            self._fresh_dir(workdir, None)
            return self._start_agent(spec, workdir, None)
        with local_uids.host_lock():
            taken = local_uids.ids_in_use() | self._dir_owners()
            uid = local_uids.pick_uid(self.uid_range.start, len(self.uid_range), taken)
            if uid is None:
                raise CapacityError(
                    f"every uid of {self.uid_range.start}..{self.uid_range.stop - 1} is in use"
                )
            self._fresh_dir(workdir, uid)
            return self._start_agent(spec, workdir, uid)

    def _dir_owners(self) -> set[int]:
        """Owners of work directories still on disk: their uid may have files to leave."""
        owners: set[int] = set()
        for workdir in self.work_root.glob("*/*"):
            with contextlib.suppress(OSError):
                owners.add(workdir.lstat().st_uid)
        return owners

    def _fresh_dir(self, workdir: Path, uid: int | None) -> None:
        """``work_root/deployment/worker``: the first two ours (searchable, not listable,
        by workers when isolated), the last the worker's, 0700."""
        shared_mode = 0o700 if uid is None else 0o711
        self.work_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = self.work_root.lstat()
        if self.work_root.is_symlink() or info.st_uid != os.getuid():
            # In a shared /tmp another user could have planted the directory.
            raise PermanentProvisionerError(
                f"work_root {self.work_root} is a symlink or not owned by this user"
            )
        workdir.parent.mkdir(mode=0o700, exist_ok=True)
        for shared in (self.work_root, workdir.parent):
            os.chmod(shared, shared_mode, follow_symlinks=False)
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(mode=0o700)
        (workdir / "tmp").mkdir(mode=0o700)
        shutil.copyfile(AGENT_FILE, workdir / AGENT_FILE.name)
        (workdir / "agent.log").touch(mode=0o600)
        if uid is not None:
            for path in (
                workdir,
                workdir / "tmp",
                workdir / AGENT_FILE.name,
                workdir / "agent.log",
            ):
                os.chown(path, uid, uid, follow_symlinks=False)

    def _start_agent(self, spec: WorkerSpec, workdir: Path, uid: int | None) -> int:
        """Run the agent's copy in ``workdir`` (readable by the worker's uid wherever the
        service's checkout lives), with an environment made here, none of the service's."""
        engine_groups, engine_env = self._engine_access(spec.capabilities)
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": str(workdir),
            "TMPDIR": str(workdir / "tmp"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            **engine_env,
            **self.options.agent_env,
            **spec.agent_environment(),
            ENV_AGENT_HOST: self.agent_host,
            MARKER: MARKER_VALUE,
        }
        as_worker: dict[str, Any] = {}
        if uid is not None:
            # umask 077: what its scripts leave in /tmp or /dev/shm is theirs alone.
            as_worker = {"user": uid, "group": uid, "extra_groups": engine_groups, "umask": 0o077}
        with open(workdir / "agent.log", "ab") as log_file:
            try:
                child = subprocess.Popen(
                    [self.python, str(workdir / AGENT_FILE.name)],
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    start_new_session=True,
                    **as_worker,
                )
            except (FileNotFoundError, PermissionError) as exc:
                raise PermanentProvisionerError(
                    f"cannot run the agent with python {self.python!r}: {exc}"
                ) from exc
        with self._children_lock:
            self._children[child.pid] = (child, spec.worker_id)
        return child.pid

    def _kill_workers(self, worker_ids: set[str], deployment_id: str | None = None) -> set[str]:
        """SIGTERM every process group holding a process of the workers, then SIGKILL.

        A process of the workers is one carrying their id in its environment or, for
        isolated workers, one holding the uid of such a process (a script that scrubbed
        its environment). Returns the ids of workers with processes that survived even
        SIGKILL. ``deployment_id`` narrows the match when known (handles do not carry it)."""
        uids = self._uids_of(worker_ids, deployment_id)
        groups = self._groups_of(worker_ids, deployment_id, uids)
        if not groups:
            return set()
        self._signal(set(groups), signal.SIGTERM)
        if not self._wait_gone(worker_ids, deployment_id, uids, set(groups), TERM_GRACE_S):
            groups |= self._groups_of(worker_ids, deployment_id, uids)
            log.warning("local_agent_kill groups=%s", sorted(groups))
            self._signal(set(groups), signal.SIGKILL)
            self._wait_gone(worker_ids, deployment_id, uids, set(groups), KILL_GRACE_S)
        return set(self._groups_of(worker_ids, deployment_id, uids).values())

    def _uids_of(self, worker_ids: set[str], deployment_id: str | None) -> dict[int, str]:
        """Uid -> worker id, for isolated workers with a live process carrying their id.

        Only a live process vouches for a uid: a work directory's owner may be a uid that
        another service process on the host has handed out again since (see local_uids)."""
        if not self.isolated:
            return {}
        uids: dict[int, str] = {}
        for proc in _scan():
            worker_id = proc.env.get(ENV_WORKER, "")
            if (
                worker_id in worker_ids
                and deployment_id in (None, proc.env.get(ENV_DEPLOYMENT))
                and proc.uid is not None
                and proc.uid in self.uid_range
            ):
                uids[proc.uid] = worker_id
        return uids

    def _groups_of(
        self, worker_ids: set[str], deployment_id: str | None, uids: dict[int, str]
    ) -> dict[int, str]:
        """Process group -> worker id, for every live process of the workers."""
        own = os.getpgrp()
        groups: dict[int, str] = {}
        for proc in _scan(set(uids)):
            worker_id: str | None = proc.env.get(ENV_WORKER)
            if worker_id not in worker_ids or deployment_id not in (
                None,
                proc.env.get(ENV_DEPLOYMENT),
            ):
                # Its id scrubbed from its environment; its uid is still the worker's.
                worker_id = uids.get(proc.uid) if proc.uid is not None else None
            if worker_id is not None and proc.pgid > 1 and proc.pgid != own:
                groups[proc.pgid] = worker_id
        return groups

    def _wait_gone(
        self,
        worker_ids: set[str],
        deployment_id: str | None,
        uids: dict[int, str],
        groups: set[int],
        grace_s: float,
    ) -> bool:
        deadline = time.monotonic() + grace_s
        while True:
            self._reap()
            if not self._groups_of(worker_ids, deployment_id, uids) and not _live_groups(groups):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)

    @staticmethod
    def _signal(groups: set[int], signum: signal.Signals) -> None:
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signum)

    def _reap(self) -> set[str]:
        """Collect exited children so they do not linger as zombies.

        Returns the worker ids of the children still running."""
        running: set[str] = set()
        with self._children_lock:
            for pid, (child, worker_id) in list(self._children.items()):
                if child.poll() is None:
                    running.add(worker_id)
                else:
                    del self._children[pid]
        return running


def _engine_socket() -> Path | None:
    """The Docker engine's UNIX socket as the service's ``DOCKER_HOST`` names it (None for
    a TCP or SSH engine: no local group to grant)."""
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        return Path(host.removeprefix("unix://"))
    return None if host else Path(DOCKER_SOCKET)


def _stripe(worker_id: str) -> int:
    return zlib.crc32(worker_id.encode()) % LOCK_STRIPES


def _component(value: str) -> str:
    """``value`` as one path component, refusing anything that could climb out."""
    if not value or value in (".", "..") or "/" in value or "\0" in value:
        raise PermanentProvisionerError(f"unsafe id for a directory name: {value!r}")
    return value


def _glob_escape(value: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in value)


def _stat_fields(pid: str) -> list[str] | None:
    """Fields after the command name in /proc/PID/stat, or None for zombies and the unreadable."""
    raw = local_uids.read_proc(pid, "stat")
    if raw is None:
        return None
    fields = raw.rpartition(b")")[2].decode(errors="replace").split()
    if len(fields) < 3 or fields[0] in ("Z", "X"):
        return None
    return fields


def _scan(uids: set[int] | None = None, *, with_uids: bool = True) -> list[_Proc]:
    """Every live process carrying the local marker, and every one whose real uid is in
    ``uids`` (marked or not). ``with_uids=False``: marked processes' ``uid`` left None,
    for callers that match on the environment alone (one file read fewer per agent)."""
    marker = f"{MARKER}={MARKER_VALUE}".encode()
    found: list[_Proc] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        raw = local_uids.read_proc(entry, "environ")
        if raw is None:
            continue  # exited meanwhile, or not ours to read
        marked = marker in raw.split(b"\0")
        uid = local_uids.process_uid(entry) if (marked and with_uids) or uids else None
        if not marked and (uid is None or uid not in (uids or ())):
            continue
        cmdline_raw = local_uids.read_proc(entry, "cmdline")
        if cmdline_raw is None:
            continue
        cmdline = cmdline_raw.split(b"\0")
        fields = _stat_fields(entry)
        if fields is None:
            continue
        env: dict[str, str] = {}
        for item in raw.split(b"\0"):
            key, _, value = item.decode(errors="surrogateescape").partition("=")
            env.setdefault(key, value)
        found.append(
            _Proc(
                pid=int(entry),
                pgid=int(fields[2]),
                env=env,
                is_agent=any(arg.endswith(AGENT_FILE.name.encode()) for arg in cmdline[1:]),
                uid=uid,
            )
        )
    return found


def _live_groups(groups: set[int]) -> bool:
    """True while any live process (marked or not) is in one of ``groups``."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(entry)
            if fields is not None and int(fields[2]) in groups:
                return True
    return False
