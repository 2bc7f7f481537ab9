"""The README's quick-start walk-through, run as written (bash and curl) against a real
``workerlease serve`` with local pools: a newcomer's first five minutes must work."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.server import ServerProcess, pool

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def walkthrough() -> str:
    """The bash block that follows "In a second terminal" in the quick start."""
    text = README.read_text()
    after = text[text.index("In a second terminal") :]
    match = re.search(r"```bash\n(.*?)```", after, re.DOTALL)
    assert match, "the README's walk-through block is gone"
    return match.group(1)


def test_the_readme_walkthrough_leases_runs_a_step_follows_it_and_releases(
    tmp_path: Path,
) -> None:
    server = ServerProcess(tmp_path, pools=[pool(min_ready=1, max_workers=3, capabilities=[])])
    try:
        server.start()
        server.wait_ready_workers(1)
        (tmp_path / "var").mkdir()
        assert server.admin_token
        (tmp_path / "var" / "admin-token").write_text(server.admin_token + "\n")
        script = walkthrough().replace("WL=http://127.0.0.1:8080", f"WL={server.url}", 1)
        assert f"WL={server.url}" in script
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout
        # The step's output, followed live, in order, then the task's end state.
        steps = [line for line in out.splitlines() if line.startswith("step ")]
        assert [s.split(" on ")[0] for s in steps] == ["step 1", "step 2", "step 3"], out
        task = next(
            json.loads(line)
            for line in out.splitlines()
            if line.startswith('{"container"') or ('"exit_code"' in line and '"lease_id"' in line)
        )
        assert (task["state"], task["exit_code"]) == ("succeeded", 0)
        assert '"state":"released"' in out.replace(" ", "") or '"released"' in out
    finally:
        server.close()
