"""Replay speed of ``workerlease simulate`` (issue 14: a simulated week of a
1-lease-per-minute pool in under 30 s).

The reader's own commands, as subprocesses: ``simulate generate --shape steady --seed 1
--pool ubuntu --rate 1 --hours H``, then ``simulate --config docs/capacity/ubuntu.yaml
--trace ... --policy adaptive --json``, timed (wall clock, and the child's CPU time from
``getrusage``, which another engineer's load on the machine does not inflate).

``before``: a git revision whose ``service``/``provisioners`` (``git archive``) replay the
same trace in the same run, first, so the two figures share the machine's state.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.benchmarks.common import ROOT

CONFIG = ROOT / "docs" / "capacity" / "ubuntu.yaml"


def _cli(args: list[str], pythonpath: Path | None = None) -> tuple[str, float, float]:
    """Run ``workerlease ARGS``; return its stdout, wall seconds and CPU seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERLEASE_")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=pythonpath or ROOT,
        check=False,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"workerlease {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.stdout, round(wall, 1), round(cpu, 1)


def _replay(trace: Path, pythonpath: Path | None = None) -> dict[str, Any]:
    command = ["simulate", "--config", str(CONFIG), "--trace", str(trace)]
    out, wall, cpu = _cli([*command, "--policy", "adaptive", "--json"], pythonpath)
    result = json.loads(out)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "passes": result["passes"],
        "pool": result["pools"]["ubuntu"],
    }


def _checkout(revision: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "service", "provisioners", "images"],
        capture_output=True,
        check=True,
    )
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def run_simulate(hours: float, before: str | None, log: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="workerlease-bench-sim-") as tmp:
        trace = Path(tmp) / "trace.csv"
        shape = ["--shape", "steady", "--seed", "1", "--pool", "ubuntu", "--rate", "1"]
        generated, _, _ = _cli(
            ["simulate", "generate", *shape, "--hours", f"{hours:g}", "--out", str(trace)]
        )
        log(f"simulate: {generated.strip()}")
        figures: dict[str, Any] = {"hours": hours, "requests": int(generated.split()[1])}
        if before:
            log(f"simulate: replaying with {before} (before)")
            old = _checkout(before, Path(tmp) / "before")
            figures["before"] = {"revision": before, **_replay(trace, old)}
        log("simulate: replaying with this checkout")
        figures["after"] = _replay(trace)
        if before:
            figures["speedup_wall"] = round(
                figures["before"]["wall_s"] / figures["after"]["wall_s"], 1
            )
            figures["speedup_cpu"] = round(
                figures["before"]["cpu_s"] / figures["after"]["cpu_s"], 1
            )
    return figures
