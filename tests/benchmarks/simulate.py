"""Replay speed of ``workerlease simulate`` (issue 14: a simulated week of a
1-lease-per-minute pool in under 30 s).

The reader's own commands, as subprocesses: ``simulate generate --shape steady --seed 1
--pool ubuntu --rate 1 --hours H``, then ``simulate --config docs/capacity/ubuntu.yaml
--trace ... --policy adaptive --json``, timed (wall clock, and the child's CPU time from
``getrusage``, which another engineer's load on the machine does not inflate).

``before``: a git revision whose ``service``/``provisioners`` (``git archive``) replay the
same trace in the same run, first, so the two figures share the machine's state.

``instructions`` (``--simulate-instructions``; needs valgrind): what a request costs in
instructions (callgrind's ``Ir``), steady where CPU time here moves by a quarter
between runs of one tree: the replays of the same steady trace's first 3 and first 6
hours, the difference over the requests between (past the warm-up and the first uses:
statements compiled, row types built, the history windows full).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.benchmarks.common import ROOT

CONFIG = ROOT / "docs" / "capacity" / "ubuntu.yaml"


# The reader's steady trace: one pool, one request a minute (``simulate generate``).
STEADY = ["--shape", "steady", "--seed", "1", "--pool", "ubuntu", "--rate", "1"]


def _run(
    args: list[str], pythonpath: Path | None, under: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``workerlease ARGS`` (under a tool such as valgrind, if given), with ``pythonpath``'s
    code when given; raises with the tail of its stderr when it fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERLEASE_")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run(
        [*(under or []), sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=pythonpath or ROOT,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"workerlease {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done


def _cli(args: list[str], pythonpath: Path | None = None) -> tuple[str, float, float]:
    """Run ``workerlease ARGS``; return its stdout, wall seconds and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = _run(args, pythonpath)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.stdout, round(wall, 1), round(cpu, 1)


def _replay_args(trace: Path) -> list[str]:
    return ["simulate", "--config", str(CONFIG), "--trace", str(trace)]


def _replay(trace: Path, pythonpath: Path | None = None) -> dict[str, Any]:
    out, wall, cpu = _cli([*_replay_args(trace), "--policy", "adaptive", "--json"], pythonpath)
    result = json.loads(out)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "passes": result["passes"],
        "pool": result["pools"]["ubuntu"],
    }


def _instructions(trace: Path, pythonpath: Path | None = None) -> int:
    """Instructions of one replay of ``trace`` (valgrind's callgrind, ``Ir``)."""
    callgrind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    args = [*_replay_args(trace), "--policy", "adaptive", "--json"]
    done = _run(args, pythonpath, under=callgrind)
    collected = re.search(r"Collected : (\d+)", done.stderr)
    if collected is None:
        raise RuntimeError(f"callgrind reported no count:\n{done.stderr[-2000:]}")
    return int(collected.group(1))


def _instructions_per_request(tmp: Path, pythonpath: Path | None = None) -> dict[str, Any]:
    """Instructions a request costs: (the first 6 hours - the first 3) / their requests."""
    counts, requests = {}, {}
    for hours in (3, 6):
        trace = tmp / f"instructions-{hours}h.csv"
        if not trace.exists():
            _cli(["simulate", "generate", *STEADY, "--hours", str(hours), "--out", str(trace)])
        requests[hours] = len(trace.read_text().splitlines()) - 1  # less the header
        counts[hours] = _instructions(trace, pythonpath)
    return {
        "instructions_3h": counts[3],
        "instructions_6h": counts[6],
        "requests_3_to_6h": requests[6] - requests[3],
        "per_request": round((counts[6] - counts[3]) / (requests[6] - requests[3])),
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


def run_simulate(
    hours: float, before: str | None, log: Callable[[str], None], instructions: bool = False
) -> dict[str, Any]:
    if instructions and shutil.which("valgrind") is None:
        raise RuntimeError("--simulate-instructions needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="workerlease-bench-sim-") as tmp:
        trace = Path(tmp) / "trace.csv"
        generated, _, _ = _cli(
            ["simulate", "generate", *STEADY, "--hours", f"{hours:g}", "--out", str(trace)]
        )
        log(f"simulate: {generated.strip()}")
        figures: dict[str, Any] = {"hours": hours, "requests": int(generated.split()[1])}
        if before:
            log(f"simulate: replaying with {before} (before)")
            old = _checkout(before, Path(tmp) / "before")
            figures["before"] = {"revision": before, **_replay(trace, old)}
        log("simulate: replaying with this checkout")
        figures["after"] = _replay(trace)
        if instructions:
            log("simulate: instructions a request, under callgrind (minutes)")
            if before:
                figures["before"]["instructions"] = _instructions_per_request(Path(tmp), old)
            figures["after"]["instructions"] = _instructions_per_request(Path(tmp))
        if before:
            figures["speedup_wall"] = round(
                figures["before"]["wall_s"] / figures["after"]["wall_s"], 1
            )
            figures["speedup_cpu"] = round(
                figures["before"]["cpu_s"] / figures["after"]["cpu_s"], 1
            )
    return figures
