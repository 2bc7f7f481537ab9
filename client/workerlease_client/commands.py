"""What each ``wl`` command does, given its parsed arguments and a ``Client``.

Exit codes: 0 done; 1 an error (one line on stderr: ``error: <title>: <detail>``);
2 a usage error; for ``wl run`` and ``wl task run`` the script's own exit code, 124
when it timed out, 125 when it did not exit by itself (could not start, lost,
cancelled by the service), 130 on Ctrl-C (143 on SIGTERM) after the task was
cancelled and the lease released.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from workerlease_client._output import (
    Progress,
    duration,
    emit_json,
    show_lease,
    show_task,
    table,
    timestamp,
)
from workerlease_client.client import Client
from workerlease_client.errors import WorkerleaseError
from workerlease_client.lease import Lease
from workerlease_client.models import TASK_END_STATES, LeaseInfo, Pool, TaskInfo

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_NOT_EXITED = 125
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class UsageError(Exception):
    pass


def parse_env(items: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    return env


def parse_files(items: Sequence[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for item in items:
        local, _, remote = item.partition(":")
        path = Path(local)
        if not path.is_file():
            raise UsageError(f"--file {item!r}: no file {local!r}")
        files[remote or path.name] = path
    return files


def script_text(parts: Sequence[str]) -> str:
    if list(parts) == ["-"]:
        return sys.stdin.read()
    if not parts:
        raise UsageError("no script: give it after --, e.g. wl run POOL -- 'make test'")
    return " ".join(parts)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Cleanup after Ctrl-C (cancel, release) goes on through one more Ctrl-C (which
    says so); the one after that abandons it."""
    presses = 0
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: types.FrameType | None) -> None:
        nonlocal presses
        presses += 1
        if presses >= 2:
            raise KeyboardInterrupt
        sys.stderr.write("\nstill cancelling and releasing; Ctrl-C again to abandon that\n")

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: nothing to shield
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_task(
    client: Client, lease_id: str, script: str, args: argparse.Namespace, **report: Any
) -> int:
    """Submit, stream the output (or collect it for --json), and map the end to an exit code.
    Interrupted, the task is cancelled first."""
    task = client.submit_task(
        lease_id,
        script,
        image=args.image,
        files=parse_files(args.file),
        env=parse_env(args.env),
        timeout=args.timeout,
        shell=args.shell,
    )
    if getattr(args, "detach", False):
        _print_task(task, args)
        return 0
    args.interrupted = "task cancelled"
    parts: list[str] = []
    try:
        for text in client.follow_log(lease_id, task.id):
            if args.json:
                parts.append(text)
            else:
                sys.stdout.write(text)
                sys.stdout.flush()
        task = client.get_task(lease_id, task.id)
    except BaseException:
        with shielded(), contextlib.suppress(WorkerleaseError):
            client.cancel_task(lease_id, task.id, cleanup=True)
        raise
    if args.json:
        report.update(task=task.raw, exit_code=task.exit_code, state=task.state, log="".join(parts))
        emit_json(report, sys.stdout)
    return exit_code(task)


def exit_code(task: TaskInfo) -> int:
    if task.state == "timed_out":
        sys.stderr.write(f"error: Timed out: task {task.id} killed after {task.timeout_s} s\n")
        return EXIT_TIMEOUT
    if task.exit_code is not None:
        return task.exit_code
    sys.stderr.write(f"error: Task {task.state}: {task.error or 'no exit code'}\n")
    return EXIT_NOT_EXITED


def cmd_run(client: Client, args: argparse.Namespace) -> int:
    """Lease, run, stream, release (unless --keep)."""
    script = script_text(args.script)  # usage errors before anything is leased
    parse_files(args.file)
    parse_env(args.env)
    progress = Progress(sys.stderr, args.pool)
    progress.active = progress.active and not args.json
    lease = Lease(client, args.pool, wait=args.wait, on_wait=progress, poll=progress.poll)
    args.interrupted = "the pending lease released"
    try:
        lease.acquire()
    finally:
        progress.done()
    args.interrupted = "lease kept" if args.keep else "lease released"
    try:
        code = run_task(client, lease.id, script, args, lease=lease.info.raw)
    except BaseException:
        _end_lease(lease, args, cleanup=True)
        raise
    _end_lease(lease, args, cleanup=False)
    return code


def _end_lease(lease: Lease, args: argparse.Namespace, *, cleanup: bool) -> None:
    """Release the lease after the task (``cleanup``: after an interrupt or error), or
    with --keep, only stop renewing it."""
    if args.keep:
        lease.detach()
        sys.stderr.write(f"lease {lease.id} kept (release: wl lease release {lease.id})\n")
        return
    with shielded():
        try:
            lease.release(cleanup=cleanup)
        except WorkerleaseError as exc:
            if not cleanup:
                raise
            # Say so, and let the interrupt or error that got here go on.
            sys.stderr.write(f"error: lease {lease.id} not released: {exc.detail}\n")
            return
    if args.interrupted == "task cancelled":
        args.interrupted = "task cancelled and lease released"


def _print_lease(lease: LeaseInfo, args: argparse.Namespace) -> None:
    if args.json:
        emit_json(lease.raw, sys.stdout)
    else:
        show_lease(lease, sys.stdout)


def _print_task(task: TaskInfo, args: argparse.Namespace) -> None:
    if args.json:
        emit_json(task.raw, sys.stdout)
    else:
        show_task(task, sys.stdout)


def cmd_pools(client: Client, args: argparse.Namespace) -> int:
    pools = client.pools()
    if args.json:
        emit_json({"pools": [p.raw for p in pools]}, sys.stdout)
        return 0
    table(
        ["NAME", "OS", "IDLE TIMEOUT", "MAX LIFETIME", "CAPABILITIES", "DESCRIPTION"],
        [_pool_row(p) for p in pools],
        sys.stdout,
    )
    return 0


def _pool_row(pool: Pool) -> list[str]:
    return [
        pool.name,
        pool.os,
        duration(pool.lease_idle_timeout_s),
        duration(pool.lease_max_lifetime_s),
        ",".join(pool.capabilities) or "-",
        pool.description,
    ]


def cmd_lease_acquire(client: Client, args: argparse.Namespace) -> int:
    if args.wait:
        progress = Progress(sys.stderr, args.pool)
        progress.active = progress.active and not args.json
        try:
            lease = client.acquire(args.pool, args.wait, on_wait=progress, poll=progress.poll)
        finally:
            progress.done()
    else:
        lease = client.request_lease(args.pool)
    if lease.existing:
        sys.stderr.write(f"note: you already held lease {lease.id} in {lease.pool}\n")
    _print_lease(lease, args)
    return 0


def cmd_lease_list(client: Client, args: argparse.Namespace) -> int:
    leases = client.leases(args.state)
    if args.json:
        emit_json({"leases": [lease.raw for lease in leases]}, sys.stdout)
        return 0
    table(
        ["ID", "POOL", "STATE", "CREATED", "IDLE EXPIRES", "WORKER"],
        [
            [
                lease.id,
                lease.pool,
                lease.state,
                timestamp(lease.created_at),
                timestamp(lease.idle_expires_at),
                lease.worker.id if lease.worker else "-",
            ]
            for lease in leases
        ],
        sys.stdout,
    )
    return 0


def cmd_lease_show(client: Client, args: argparse.Namespace) -> int:
    _print_lease(client.get_lease(args.lease_id), args)
    return 0


def cmd_lease_renew(client: Client, args: argparse.Namespace) -> int:
    _print_lease(client.renew_lease(args.lease_id), args)
    return 0


def cmd_lease_release(client: Client, args: argparse.Namespace) -> int:
    _print_lease(client.release_lease(args.lease_id), args)
    return 0


def cmd_task_run(client: Client, args: argparse.Namespace) -> int:
    return run_task(client, args.lease_id, script_text(args.script), args)


def cmd_task_list(client: Client, args: argparse.Namespace) -> int:
    tasks = client.tasks(args.lease_id)
    if args.json:
        emit_json({"tasks": [task.raw for task in tasks]}, sys.stdout)
        return 0
    table(
        ["ID", "STATE", "EXIT", "CREATED", "FINISHED", "IMAGE"],
        [
            [
                task.id,
                task.state,
                "-" if task.exit_code is None else str(task.exit_code),
                timestamp(task.created_at),
                timestamp(task.finished_at),
                task.image or "-",
            ]
            for task in tasks
        ],
        sys.stdout,
    )
    return 0


def cmd_task_log(client: Client, args: argparse.Namespace) -> int:
    if not args.json:
        for text in client.follow_log(args.lease_id, args.task_id, follow=args.follow):
            sys.stdout.write(text)
            sys.stdout.flush()
        return 0
    parts: list[bytes] = []
    offset = 0
    while True:  # what there is now; with --follow, until the task ends
        chunk = client.read_log(args.lease_id, args.task_id, offset, 30 if args.follow else 0)
        parts.append(chunk.data)
        offset = chunk.next_offset
        if not chunk.data and (not args.follow or chunk.state in TASK_END_STATES):
            break
    text = b"".join(parts).decode("utf-8", errors="replace")
    emit_json({"log": text, "next_offset": offset, "state": chunk.state}, sys.stdout)
    return 0


def cmd_task_cancel(client: Client, args: argparse.Namespace) -> int:
    _print_task(client.cancel_task(args.lease_id, args.task_id), args)
    return 0
