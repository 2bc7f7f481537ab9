"""Uids of their own for local workers: whether we can, and which one a new worker gets.

A worker under a uid (and gid) of its own, with no supplementary groups, cannot
signal, ptrace or read ``/proc/PID/environ`` of another worker or of the service,
and reaches only files that are world-readable or its own. That takes a service
running as root with the capabilities listed in ``NEEDED_CAPS``; without them the
local provisioner runs workers under its own uid (see :func:`isolation_unavailable`).

Allocation: a uid from the configured range, picked at random among those that
no live process on the host holds (real, effective, saved or filesystem uid or
gid) and no work directory under the provisioner's ``work_root`` is owned by.
The pick and the start of the agent under it happen under one host-wide ``flock``
(``LOCK_PATH``), so two service processes on one host (replicas, or a restart
that overlaps the old process) never hand out the same uid: the uid is in
``/proc`` before the lock is released. Nothing is stored, so a restart needs no
state: a running worker's agent is itself the record that its uid is taken.

Random rather than lowest-free: files a tenant leaves outside its work directory
(``/tmp``, ``/dev/shm``) survive ``destroy`` and stay readable by that uid. With
the default range a later worker gets a given freed uid with a chance of 1 in
65536 per start, not at once. Workers' umask is ``077``, so such files are not
readable by the other uids meanwhile. Where leftovers must never meet a later
tenant, use the docker or ec2 provisioner.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

LOCK_PATH = Path("/run/workerlease-local-uids.lock")  # /run is root's: nobody plants it

# Capability bits (linux/capability.h) isolation needs, and why.
NEEDED_CAPS = {
    0: "CAP_CHOWN",  # give the work directory to the worker's uid
    1: "CAP_DAC_OVERRIDE",  # remove the worker's files on destroy
    5: "CAP_KILL",  # signal processes of other uids on destroy
    6: "CAP_SETGID",  # start the agent under its gid, without groups
    7: "CAP_SETUID",  # start the agent under its uid
    19: "CAP_SYS_PTRACE",  # read /proc/PID/environ of other uids: ownership scans
}


def isolation_unavailable() -> str | None:
    """Why workers cannot get uids of their own here, or None when they can."""
    if os.geteuid() != 0:
        return "service_not_root"
    effective = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                effective = int(line.split()[1], 16)
    missing = [name for bit, name in NEEDED_CAPS.items() if not effective >> bit & 1]
    return f"missing_{'+'.join(missing)}" if missing else None


def unreachable_part(path: Path, need: int = stat.S_IXOTH) -> Path | None:
    """The first directory on ``path`` (or ``path`` itself lacking ``need``) that a uid
    which is neither owner nor group cannot pass; None when it can.

    Checked on the path as written and as resolved (symlinks), by mode bits only.
    """
    for candidate in dict.fromkeys([path.absolute(), path.resolve()]):
        for directory in reversed(candidate.parents):
            with contextlib.suppress(FileNotFoundError):
                if not os.stat(directory).st_mode & stat.S_IXOTH:
                    return directory
        with contextlib.suppress(FileNotFoundError):
            if not os.stat(candidate).st_mode & need:
                return candidate
    return None


def read_proc(pid: int | str, name: str) -> bytes | None:
    """``/proc/PID/NAME`` whole, or None when the process is gone or not ours to read.

    With the os calls directly: a scan reads one file of every process on the host,
    and ``Path.read_bytes`` took about 2.5 times as long per file."""
    try:
        fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _ids(status: bytes, field: bytes) -> list[int]:
    """The values of one ``Uid:``/``Gid:`` line of ``/proc/PID/status`` (real, effective,
    saved, filesystem)."""
    start = status.find(b"\n" + field)
    if start < 0:
        return []
    start += len(field) + 1
    return [int(value) for value in status[start : status.find(b"\n", start)].split()]


def ids_in_use() -> set[int]:
    """Every uid and gid a process on the host holds (zombies included: cheap, safe)."""
    used: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        status = read_proc(entry, "status")
        if status is None:
            continue  # exited meanwhile
        used.update(_ids(status, b"Uid:"))
        used.update(_ids(status, b"Gid:"))
    return used


def process_uid(pid: int | str) -> int | None:
    """The real uid of a process, or None when it is gone."""
    status = read_proc(pid, "status")
    uids = _ids(status, b"Uid:") if status is not None else []
    return uids[0] if uids else None


@contextlib.contextmanager
def host_lock(path: Path = LOCK_PATH) -> Iterator[None]:
    """Exclusive across every process (and every open of the file) on the host."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def pick_uid(first: int, size: int, taken: Iterable[int]) -> int | None:
    """A random uid of ``range(first, first + size)`` not in ``taken``; None when all are."""
    taken = set(taken)
    free_count = size - sum(1 for uid in taken if first <= uid < first + size)
    if free_count <= 0:
        return None
    rng = random.SystemRandom()
    while True:  # the range has a free uid, and most are free: a few draws at most
        uid = first + rng.randrange(size)
        if uid not in taken:
            return uid
