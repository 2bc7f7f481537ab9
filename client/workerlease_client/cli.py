"""``wl``: the tenant's command line (the commands themselves: commands.py)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import types
from collections.abc import Callable, Sequence
from typing import NoReturn

from workerlease_client import __version__
from workerlease_client.client import Client
from workerlease_client.commands import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    UsageError,
    cmd_lease_acquire,
    cmd_lease_list,
    cmd_lease_release,
    cmd_lease_renew,
    cmd_lease_show,
    cmd_pools,
    cmd_run,
    cmd_task_cancel,
    cmd_task_list,
    cmd_task_log,
    cmd_task_run,
)
from workerlease_client.errors import WorkerleaseError


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: usage: {message} (see: {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


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
