"""``wl`` without a server: ``--help`` and ``--version`` on every command, usage errors,
tables, and the progress line that only a terminal gets."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from workerlease_client import __version__
from workerlease_client._output import Progress, table
from workerlease_client.cli import main, parse
from workerlease_client.models import LeaseInfo

COMMANDS = [
    [],
    ["pools"],
    ["lease"],
    ["lease", "acquire"],
    ["lease", "list"],
    ["lease", "show"],
    ["lease", "renew"],
    ["lease", "release"],
    ["task"],
    ["task", "run"],
    ["task", "list"],
    ["task", "log"],
    ["task", "cancel"],
    ["run"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "wl")
def test_help_and_version_on_every_command(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: wl {' '.join(command)}".rstrip())
    with pytest.raises(SystemExit) as done:
        main([*command, "--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"wl {__version__}\n"


def test_the_console_script_is_installed() -> None:
    wl = Path(sys.executable).parent / "wl"
    result = subprocess.run(
        [str(wl), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout) == (0, f"wl {__version__}\n")


@pytest.mark.parametrize(
    "argv",
    [
        ["nope"],
        ["lease", "show"],
        ["run"],
        ["task", "log", "l-1"],
        ["lease", "acquire", "p", "--wait", "x"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: usage: "), captured.err


def test_bad_env_and_file_options_are_usage_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKERLEASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WORKERLEASE_TOKEN", "wlt_x")
    assert main(["run", "p", "--env", "NOEQUALS", "--", "true"]) == 2
    assert main(["run", "p", "--file", "/no/such/file", "--", "true"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0:2] for line in errors] == [["error", " usage"]] * 2


def test_tables_align_columns() -> None:
    out = io.StringIO()
    table(["ID", "STATE"], [["l-1", "active"], ["l-000002", "released"]], out)
    assert out.getvalue().splitlines() == [
        "ID        STATE",
        "l-1       active",
        "l-000002  released",
    ]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_while_waiting_only_on_a_terminal() -> None:
    lease = LeaseInfo.from_json({"id": "l-1", "pool": "p", "state": "pending"})
    terminal = _Terminal()
    progress = Progress(terminal, "p")
    progress(lease, 12.7)
    progress.done()
    assert "waiting for a worker in p: lease l-1 pending, 12 s" in terminal.getvalue()
    assert progress.poll == 2

    piped = io.StringIO()
    quiet = Progress(piped, "p")
    quiet(lease, 12.7)
    quiet.done()
    assert piped.getvalue() == "" and quiet.poll == 60


def test_everything_after_the_first_double_dash_is_the_script() -> None:
    args = parse(["run", "p", "--env", "A=1", "--file", "x", "--", "echo", "--json", "--", "x"])
    assert args.script == ["echo", "--json", "--", "x"]
    assert args.env == ["A=1"] and not args.json
    assert parse(["task", "run", "l-1", "--", "make test"]).script == ["make test"]
