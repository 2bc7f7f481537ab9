"""``local_uids``' readers of ``/proc``, against the real ``/proc`` of this host."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from provisioners import local_uids
from tests.support.server import wait_until


def _wait_exec(pid: int, program: bytes, timeout: float = 30.0) -> bytes:
    """Until the child runs ``program`` with its environment in place; that environment.

    Between fork and exec its /proc is the parent's; and exec sets the new image's
    argument bounds before its environment's, so for a moment cmdline already reads the
    program while environ still reads empty (seen on a busy host)."""

    def environ_once_exec_is_done() -> bytes | None:
        cmdline = local_uids.read_proc(pid, "cmdline") or b""
        return local_uids.read_proc(pid, "environ") if cmdline.split(b"\0")[0] == program else None

    environ: bytes = wait_until(
        environ_once_exec_is_done, timeout, interval=0.01, message=f"{pid} never ran {program!r}"
    )
    return environ


def test_process_uid_is_the_real_uid_and_none_once_gone() -> None:
    assert local_uids.process_uid(os.getpid()) == os.getuid()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its /proc entry is gone
    assert local_uids.process_uid(child.pid) is None


def test_read_proc_reads_past_one_chunk_and_none_for_a_missing_process() -> None:
    # An environment larger than one os.read (one variable may hold at most 128 KiB).
    big = {f"WL_BIG{i}": str(i) * 100_000 for i in range(2)}
    expected = [f"{k}={v}".encode() for k, v in big.items()]
    child = subprocess.Popen(["cat"], env=big, stdin=subprocess.PIPE)
    try:
        environ = _wait_exec(child.pid, b"cat")
        assert environ.split(b"\0")[:2] == expected
    finally:
        child.communicate(b"")
    assert local_uids.read_proc(child.pid, "environ") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a process under other ids takes root")
def test_ids_in_use_holds_every_uid_and_gid_of_a_live_process() -> None:
    uid, gid = 2_999_001, 2_999_002  # far from any id this host hands out
    assert not {uid, gid} & local_uids.ids_in_use()
    child = subprocess.Popen(
        ["cat"],  # a system binary: any uid may run it
        user=uid,
        group=gid,
        extra_groups=[],
        stdin=subprocess.PIPE,
    )
    try:
        _wait_exec(child.pid, b"cat")
        assert {uid, gid} <= local_uids.ids_in_use()
        assert local_uids.process_uid(child.pid) == uid
    finally:
        child.communicate(b"")
