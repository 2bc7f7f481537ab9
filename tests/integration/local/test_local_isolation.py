"""Local workers under uids of their own: what one worker's scripts can no longer reach.

Run as root (as CI does): the real local provisioner starts real agents, and every
attempt goes through worker A's agent HTTP API with its access token, as a tenant's
script would. Each attempt is checked for its specific failure (exit code and
message), and the target is checked to be untouched afterwards.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from provisioners import local_uids
from provisioners.base import (
    CapacityError,
    PermanentProvisionerError,
    WorkerHandle,
    WorkerSpec,
)
from provisioners.local import MARKER, LocalOptions, LocalProvisioner
from tests.integration.local.support import POOL, FakeService, alive, wait_for
from tests.support.server import worker_root

NOBODY = 65534
_unavailable = local_uids.isolation_unavailable()
needs_isolation = pytest.mark.skipif(
    _unavailable is not None, reason=f"workers cannot get uids here: {_unavailable}"
)
pytestmark = pytest.mark.integration

AGENT_ENV = {
    "PATH",
    "HOME",
    "TMPDIR",
    "LANG",
    "WORKERLEASE_URL",
    "WORKERLEASE_WORKER_ID",
    "WORKERLEASE_DEPLOYMENT",
    "WORKERLEASE_INSTALLATION",
    "WORKERLEASE_POOL",
    "WORKERLEASE_BOOTSTRAP_TOKEN",
    "WORKERLEASE_AGENT_PORT",
    "WORKERLEASE_AGENT_HOST",
    MARKER,
}
PTRACE_ATTACH = """\
"$PY" - "$TARGET" <<'EOF'
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
result = libc.ptrace(16, int(sys.argv[1]), None, None)  # PTRACE_ATTACH
print(result, ctypes.get_errno())
EOF
"""


def status_ids(pid: int) -> dict[str, list[int]]:
    """Uid, Gid and Groups lines of /proc/PID/status."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {
        key: [int(v) for v in rest.split()]
        for key, _, rest in (line.partition(":") for line in lines)
        if key in ("Uid", "Gid", "Groups")
    }


def environ_keys(pid: int) -> set[str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return {item.split(b"=", 1)[0].decode() for item in raw.split(b"\0") if item}


def attempt(service: FakeService, worker_id: str, script: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``script`` run through the worker's agent."""
    result = service.run(worker_id, script)
    return result["exit_code"], result["stdout"], result["stderr"]


@pytest.fixture
def secrets_dir() -> Iterator[Path]:
    """Stands in for the service's files: root's, 0600, in directories anyone may pass
    through (0711), so only the files' own mode keeps workers out."""
    root = worker_root("workerlease-secrets-")
    (root / "workerlease.db").write_text("SQLite format 3 stand-in\n")
    (root / "fernet.key").write_text("key-stand-in\n")
    for name in ("workerlease.db", "fernet.key"):
        (root / name).chmod(0o600)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@needs_isolation
def test_workers_run_under_uids_of_their_own_with_private_dirs_and_only_the_agent_env(
    provisioner: LocalProvisioner,
    service: FakeService,
    spec: Callable[..., WorkerSpec],
    work_root: Path,
    deployment: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORKERLEASE_ADMIN_TOKEN", "admin-secret-of-the-service")
    monkeypatch.setenv("WORKERLEASE_DATABASE_URL", "sqlite:////srv/workerlease.db")
    a, b = spec(), spec()

    pids = {w.worker_id: int(provisioner.create(w).provider_id) for w in (a, b)}

    assert provisioner.isolated is True
    uids = {}
    for worker_id, pid in pids.items():
        ids = status_ids(pid)
        uid = ids["Uid"][0]
        assert ids["Uid"] == [uid] * 4 and ids["Gid"] == [uid] * 4  # real, eff, saved, fs
        assert ids["Groups"] == []
        assert uid in provisioner.uid_range
        uids[worker_id] = uid
        workdir = work_root / deployment / worker_id
        info = workdir.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, uid, 0o700)
        assert environ_keys(pid) == AGENT_ENV  # nothing of the service's environment
        exit_code, stdout, _ = attempt(service, worker_id, "id -u; id -g; id -G; env; pwd")
        assert exit_code == 0
        assert stdout.splitlines()[:3] == [str(uid), str(uid), str(uid)]
        assert "admin-secret-of-the-service" not in stdout and "DATABASE_URL" not in stdout
        assert stdout.splitlines()[-1] == str(workdir)
    assert uids[a.worker_id] != uids[b.worker_id]
    for shared in (work_root, work_root / deployment):
        assert (shared.stat().st_uid, stat.S_IMODE(shared.stat().st_mode)) == (0, 0o711)


@needs_isolation
def test_a_worker_cannot_read_signal_or_trace_another_worker_or_the_service(
    provisioner: LocalProvisioner,
    service: FakeService,
    spec: Callable[..., WorkerSpec],
    work_root: Path,
    deployment: str,
    secrets_dir: Path,
) -> None:
    a, b = spec(), spec()
    provisioner.create(a)
    b_pid = int(provisioner.create(b).provider_id)
    service.agent_url(b.worker_id)
    b_dir = work_root / deployment / b.worker_id
    me = os.getpid()  # the test process stands in for the service

    def run(script: str) -> tuple[int, str, str]:
        return attempt(service, a.worker_id, script)

    # B's work directory and files.
    assert run(f"ls {b_dir}") == (
        2,
        "",
        f"ls: cannot open directory '{b_dir}': Permission denied\n",
    )
    assert run(f"cat {b_dir}/agent.log") == (1, "", f"cat: {b_dir}/agent.log: Permission denied\n")
    assert run(f"touch {b_dir}/planted") == (
        1,
        "",
        f"touch: cannot touch '{b_dir}/planted': Permission denied\n",
    )
    # Environments: B's agent (its bootstrap token) and the service (its admin token).
    for pid in (b_pid, me):
        assert run(f"cat /proc/{pid}/environ") == (
            1,
            "",
            f"cat: /proc/{pid}/environ: Permission denied\n",
        )
    # Signals and ptrace.
    for pid in (b_pid, me):
        for signal_option in ("-0", "-TERM"):
            exit_code, stdout, stderr = run(f"kill {signal_option} {pid}")
            assert (exit_code, stdout) == (1, "")
            assert ": 1: kill: Operation not permitted\n" in stderr, stderr
        exit_code, stdout, _ = run(f"PY={provisioner.python} TARGET={pid}\n{PTRACE_ATTACH}")
        assert (exit_code, stdout) == (0, "-1 1\n")  # ptrace failed with EPERM
    # The service's database and key: the directories let A through, the files do not.
    for name in ("workerlease.db", "fernet.key"):
        secret = secrets_dir / name
        exit_code, stdout, _ = run(f"ls -l {secret}")
        assert exit_code == 0 and stdout.startswith("-rw------- 1 root root"), stdout
        assert run(f"cat {secret}") == (1, "", f"cat: {secret}: Permission denied\n")

    assert alive(b_pid) and alive(me)
    assert attempt(service, b.worker_id, "echo still-here")[:2] == (0, "still-here\n")
    assert sorted(p.name for p in b_dir.iterdir()) == ["agent.log", "tmp", "workerlease_agent.py"]


@needs_isolation
def test_destroy_kills_a_script_that_scrubbed_its_env_and_left_its_session(
    provisioner: LocalProvisioner, service: FakeService, spec: Callable[..., WorkerSpec]
) -> None:
    worker = spec()
    handle = provisioner.create(worker)
    escaped = int(
        attempt(service, worker.worker_id, "env -i setsid sleep 300 >/dev/null 2>&1 &\necho $!")[1]
    )
    wait_for(lambda: Path(f"/proc/{escaped}/cmdline").read_bytes().startswith(b"sleep"))
    assert os.getsid(escaped) == escaped and MARKER not in environ_keys(escaped)

    provisioner.destroy(handle)

    assert not alive(escaped)


@needs_isolation
def test_a_work_root_that_worker_uids_cannot_reach_is_refused_at_start(tmp_path: Path) -> None:
    private = tmp_path.parent  # pytest's own directories are 0700
    assert not private.stat().st_mode & stat.S_IXOTH

    with pytest.raises(PermanentProvisionerError, match="is not searchable by other users"):
        LocalProvisioner(POOL, LocalOptions(work_root=str(tmp_path / "workers")))


@pytest.fixture
def small_range() -> int:
    """The start of a 2-uid range no other test here uses (ranges are per test)."""
    return 3_000_000 + random.randrange(100_000) * 8


@needs_isolation
def test_a_uid_held_by_any_process_is_skipped_and_the_range_can_run_out(
    service: FakeService,
    spec: Callable[..., WorkerSpec],
    work_root: Path,
    small_range: int,
) -> None:
    options = LocalOptions(work_root=str(work_root), uid_range_start=small_range, uid_range_size=2)
    provisioner = LocalProvisioner(POOL, options)
    squatter = subprocess.Popen(
        ["sleep", "300"], user=small_range, group=small_range, extra_groups=[]
    )
    handles: list[WorkerHandle] = []
    try:
        handles.append(provisioner.create(spec()))
        assert local_uids.process_uid(handles[0].provider_id) == small_range + 1

        with pytest.raises(CapacityError, match="in use"):
            provisioner.create(spec())

        squatter.kill()
        squatter.wait(10)
        handles.append(provisioner.create(spec()))
        assert local_uids.process_uid(handles[1].provider_id) == small_range
    finally:
        squatter.kill()
        squatter.wait(10)
        provisioner.destroy_many(handles)


@needs_isolation
def test_two_provisioners_starting_at_once_never_share_a_uid(
    service: FakeService,
    spec: Callable[..., WorkerSpec],
    work_root: Path,
    small_range: int,
) -> None:
    """Two provisioner objects are two service processes to the host lock (a lock per
    open of the file), and their work roots differ: only the lock and /proc keep six
    starts on a range of six uids apart."""
    other_root = worker_root()
    options = [
        LocalOptions(work_root=str(root), uid_range_start=small_range, uid_range_size=6)
        for root in (work_root, other_root / "workers")
    ]
    provisioners = [LocalProvisioner(POOL, o) for o in options]
    handles: list[tuple[LocalProvisioner, WorkerHandle]] = []
    barrier = threading.Barrier(6)

    def start(provisioner: LocalProvisioner) -> None:
        worker = spec()
        barrier.wait(30)
        handles.append((provisioner, provisioner.create(worker)))

    threads = [threading.Thread(target=start, args=(provisioners[i % 2],)) for i in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)

        uids = [local_uids.process_uid(handle.provider_id) for _, handle in handles]
        assert sorted(uids) == list(range(small_range, small_range + 6))
    finally:
        for provisioner, handle in handles:
            provisioner.destroy(handle)
        shutil.rmtree(other_root, ignore_errors=True)


def _python_for_nobody() -> tuple[str, str]:
    """An interpreter ``nobody`` can run with this checkout's dependencies, and the
    PYTHONPATH it needs; the venv's may live under a private home (pyenv under /root)."""
    repo = str(Path(__file__).resolve().parents[3])
    site = next(p for p in sys.path if p.endswith("site-packages"))
    for python in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if python and local_uids.unreachable_part(Path(python), stat.S_IXOTH) is None:
            return python, f"{repo}:{site}"
    pytest.skip("no python that nobody can run")


NON_ROOT_SERVICE = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from provisioners.base import WorkerSpec
from provisioners.local import LocalOptions, LocalProvisioner
work_root, worker_id, deployment, url = sys.argv[1:]
provisioner = LocalProvisioner("pool-dev", LocalOptions(work_root=work_root, python=sys.executable))
spec = WorkerSpec(worker_id, "pool-dev", "linux", deployment, url, "bootstrap-secret")
handle = provisioner.create(spec)
print(json.dumps({"isolated": provisioner.isolated, "pid": int(handle.provider_id)}), flush=True)
sys.stdin.readline()
provisioner.destroy(handle)
print(json.dumps({"after": provisioner.describe([handle])[worker_id]}), flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming nobody needs root")
def test_a_service_that_is_not_root_still_runs_workers_and_says_they_are_not_isolated(
    service: FakeService, work_root: Path, deployment: str, provisioner: LocalProvisioner
) -> None:
    """``provisioner`` (root's) only cleans up what a failure would leave behind."""
    python, pythonpath = _python_for_nobody()
    work_root.parent.chmod(0o777)  # nobody creates the work root itself, as a user would
    worker_id = f"w-nobody-{random.randrange(16**8):08x}"
    child = subprocess.Popen(
        [python, "-c", NON_ROOT_SERVICE, str(work_root), worker_id, deployment, service.url],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        env={"PYTHONPATH": pythonpath, "PATH": "/usr/bin:/bin"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None

    def answer() -> dict[str, object]:
        ready, _, _ = select.select([child.stdout], [], [], 60)  # bounds a hang only
        line = child.stdout.readline() if ready else b""
        assert line, f"no answer from the non-root service: {child.stderr.read1().decode()}"
        result: dict[str, object] = json.loads(line)
        return result

    try:
        started = answer()
        assert started["isolated"] is False
        assert isinstance(started["pid"], int)
        assert status_ids(started["pid"])["Uid"][0] == NOBODY
        assert attempt(service, worker_id, "id -u")[:2] == (0, f"{NOBODY}\n")

        child.stdin.write(b"destroy\n")
        child.stdin.flush()
        assert answer() == {"after": "gone"}
        assert child.wait(30) == 0
        stderr = child.stderr.read().decode()
        assert stderr.count("WARNING local_workers_not_isolated pool=pool-dev") == 1, stderr
        assert "reason=service_not_root" in stderr
    finally:
        child.kill()
        child.wait(10)
