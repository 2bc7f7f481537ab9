"""The README's quick-start walk-through and its "For tenants" section, run as written
(bash, curl, wl and the SDK) against a real ``workerlease serve`` with local pools: a
newcomer's first five minutes must work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.server import ServerProcess, pool

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
VENV_BIN = Path(sys.executable).parent


def block(after: str, language: str = "bash") -> str:
    """The first fenced block of ``language`` after the text ``after``."""
    text = README.read_text()
    rest = text[text.index(after) :]
    match = re.search(rf"```{language}\n(.*?)```", rest, re.DOTALL)
    assert match, f"the README's block after {after!r} is gone"
    return match.group(1)


def bash(script: str, cwd: Path, strict: bool = True) -> subprocess.CompletedProcess[str]:
    flags = "-euo" if strict else "-uo"
    return subprocess.run(
        ["bash", flags, "pipefail", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_the_readme_walkthrough_then_wl_and_the_sdk(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, pools=[pool(min_ready=1, max_workers=3, capabilities=[])])
    try:
        server.start()
        server.wait_ready_workers(1)
        (tmp_path / "var").mkdir()
        assert server.admin_token
        (tmp_path / "var" / "admin-token").write_text(server.admin_token + "\n")
        walkthrough = block("In a second terminal").replace(
            "WL=http://127.0.0.1:8080", f"WL={server.url}", 1
        )
        assert f"WL={server.url}" in walkthrough
        done = bash(walkthrough, tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout
        # The step's output, followed live, in order, then the task's end state.
        steps = [line for line in out.splitlines() if line.startswith("step ")]
        assert [s.split(" on ")[0] for s in steps] == ["step 1", "step 2", "step 3"], out
        answers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        task = next(a for a in answers if "exit_code" in a)
        assert (task["state"], task["exit_code"]) == ("succeeded", 0)
        released = next(a for a in answers if a.get("end_reason") == "released")
        assert released["id"] == task["lease_id"]

        # "For tenants" goes on in the same shell (it uses $TOKEN from step 1).
        tenants = (
            block("## For tenants")
            .replace(".venv/bin/wl", str(VENV_BIN / "wl"))
            .replace("WORKERLEASE_URL=http://127.0.0.1:8080", f"WORKERLEASE_URL={server.url}")
        )
        done = bash(walkthrough + "\nset +e\n" + tenants + 'echo "token=$TOKEN"\n', tmp_path, False)
        assert "step 1\nstep 2\nstep 3\n3\n" in done.stdout, done.stdout + done.stderr
        token = re.search(r"^token=(wlt_\S+)$", done.stdout, re.MULTILINE)
        assert token, done.stdout
        sdk = subprocess.run(
            [sys.executable, "-c", block("## For tenants", "python")],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
            env={**os.environ, "WORKERLEASE_URL": server.url, "WORKERLEASE_TOKEN": token[1]},
        )
        assert sdk.returncode == 0, sdk.stdout + sdk.stderr
        assert sdk.stdout.startswith("0 hello from"), sdk.stdout
    finally:
        server.close()
