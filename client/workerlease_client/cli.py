"""``wl``: the tenant's command line.

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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from workerlease_client import __version__
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


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: usage: {message} (see: {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


# ---- arguments ------------------------------------------------------------------------


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


# ---- running a task -------------------------------------------------------------------


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
            client.cancel_task(lease_id, task.id)
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
    try:
        code = run_task(client, lease.id, script, args, lease=lease.info.raw)
    finally:
        if args.keep:
            lease.detach()
            sys.stderr.write(f"lease {lease.id} kept (release: wl lease release {lease.id})\n")
        else:
            with shielded():
                lease.release()
            if args.interrupted == "task cancelled":
                args.interrupted = "task cancelled and lease released"
    return code


# ---- commands -------------------------------------------------------------------------


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


# ---- the parser -----------------------------------------------------------------------


def _common() -> _Parser:
    """Options every command takes, before or after its name. Defaults are suppressed so
    a subcommand does not overwrite a value given before it."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--url", default=argparse.SUPPRESS, help="service URL (default: $WORKERLEASE_URL)"
    )
    common.add_argument(
        "--token", default=argparse.SUPPRESS, help="tenant token (default: $WORKERLEASE_TOKEN)"
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    common.add_argument("--version", action="version", version=f"wl {__version__}")
    return common


def _task_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", help="run inside this container image (name:tag)")
    parser.add_argument("--timeout", type=int, help="kill the script after S seconds")
    parser.add_argument("--shell", choices=["sh", "bash", "powershell", "cmd"])
    parser.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="environment variable"
    )
    parser.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="LOCAL[:REMOTE]",
        help="upload a file into the task's directory",
    )
    parser.add_argument(
        "script", nargs="*", metavar="SCRIPT", help="after --; '-' reads it from stdin"
    )


Handler = Callable[[Client, argparse.Namespace], int]


Commands = argparse._SubParsersAction  # the group add_subparsers() returns


def _command(group: Commands[_Parser], name: str, handler: Handler | None, text: str) -> _Parser:
    sub = group.add_parser(name, help=text, description=text, parents=[_common()])
    if handler is not None:
        sub.set_defaults(handler=handler)
    return sub


def _lease_commands(commands: Commands[_Parser]) -> None:
    lease = _command(commands, "lease", None, "acquire, list, show, renew and release leases")
    leases = lease.add_subparsers(dest="lease_command", metavar="COMMAND", required=True)
    acquire = _command(leases, "acquire", cmd_lease_acquire, "lease a worker of POOL")
    acquire.add_argument("pool", metavar="POOL")
    acquire.add_argument(
        "--wait", type=float, default=0, metavar="S", help="wait up to S seconds for a worker"
    )
    listing = _command(leases, "list", cmd_lease_list, "your leases (live ones by default)")
    listing.add_argument(
        "--state",
        default="live",
        choices=["live", "all", "pending", "active", "released", "expired", "revoked", "failed"],
    )
    for name, handler, text in (
        ("show", cmd_lease_show, "show a lease"),
        ("renew", cmd_lease_renew, "push a lease's idle deadline out"),
        ("release", cmd_lease_release, "release a lease (its worker is destroyed)"),
    ):
        _command(leases, name, handler, text).add_argument("lease_id", metavar="LEASE_ID")


def _task_commands(commands: Commands[_Parser]) -> None:
    task = _command(commands, "task", None, "run, list, follow and cancel tasks of a lease")
    tasks = task.add_subparsers(dest="task_command", metavar="COMMAND", required=True)
    run = _command(tasks, "run", cmd_task_run, "run SCRIPT on the lease's worker")
    run.add_argument("lease_id", metavar="LEASE_ID")
    run.add_argument(
        "--detach", action="store_true", help="print the task and return without waiting"
    )
    _task_options(run)
    listing = _command(tasks, "list", cmd_task_list, "the lease's tasks, oldest first")
    listing.add_argument("lease_id", metavar="LEASE_ID")
    log = _command(tasks, "log", cmd_task_log, "print a task's output")
    log.add_argument("--follow", "-f", action="store_true", help="until the task ends")
    cancel = _command(tasks, "cancel", cmd_task_cancel, "cancel a task")
    for sub in (log, cancel):
        sub.add_argument("lease_id", metavar="LEASE_ID")
        sub.add_argument("task_id", metavar="TASK_ID")


def _run_command(commands: Commands[_Parser]) -> None:
    run = _command(
        commands,
        "run",
        cmd_run,
        "lease a worker of POOL, run SCRIPT on it with its output streamed, release it; "
        "exit with the script's exit code (124: timed out, 130: interrupted)",
    )
    run.add_argument("pool", metavar="POOL")
    run.add_argument(
        "--wait", type=float, default=600, metavar="S", help="wait up to S s for a worker (600)"
    )
    run.add_argument("--keep", action="store_true", help="keep the lease (print its id)")
    _task_options(run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="wl",
        description="Lease workerlease workers and run steps on them.",
        parents=[_common()],
        epilog="Environment: WORKERLEASE_URL, WORKERLEASE_TOKEN.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _command(commands, "pools", cmd_pools, "list the pools you can lease from")
    _lease_commands(commands)
    _task_commands(commands)
    _run_command(commands)
    return parser


def _terminate(signum: int, frame: types.FrameType | None) -> None:
    raise _Terminated


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (cancel, release), with its own exit code."""


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Everything after the first ``--`` is the script, taken verbatim. (argparse alone
    loses it when options such as ``--env`` come between the pool and ``--``.)"""
    argv = list(argv)
    after: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, after = argv[:split], argv[split + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if after:
        if not hasattr(args, "script"):
            parser.error(f"unexpected arguments after --: {' '.join(after)}")
        args.script = [*args.script, *after]
    args.json = getattr(args, "json", False)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    with contextlib.suppress(ValueError):  # not the main thread (embedded): leave it
        signal.signal(signal.SIGTERM, _terminate)
    try:
        with Client(getattr(args, "url", None), getattr(args, "token", None)) as client:
            handler: Handler = args.handler
            return handler(client, args)
    except UsageError as exc:
        sys.stderr.write(f"error: usage: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        done = getattr(args, "interrupted", "")
        sys.stderr.write(f"\nerror: Interrupted: {done or 'stopped'}\n")
        return EXIT_TERMINATED if isinstance(exc, _Terminated) else EXIT_INTERRUPTED
    except WorkerleaseError as exc:
        sys.stderr.write(f"error: {exc.title}: {exc.detail}\n")
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
