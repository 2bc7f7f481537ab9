"""What a ``local`` create and destroy cost the process that calls them (the scheduler):
its own CPU per worker, the agents' excluded.

    python -m tests.benchmarks.local_create_cost [--workers 60]

Run it with ``PYTHONPATH`` set to each tree to compare two revisions, alternating. The
agents are given a service URL nobody listens on (port 9 of loopback): they start and
keep retrying their ready call, so only the provisioner's own work is measured. Its
cost grows with the processes on the host (each create scans ``/proc``); the count is
printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import uuid

from provisioners.base import WorkerSpec
from provisioners.local import LocalOptions, LocalProvisioner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=60)
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="wl-create-cost-")
    provisioner = LocalProvisioner("cost", LocalOptions(work_root=root))
    deployment = f"cost-{uuid.uuid4().hex[:8]}"
    specs = [
        WorkerSpec(
            worker_id=f"w-{uuid.uuid4().hex}",
            pool="cost",
            os="linux",
            deployment_id=deployment,
            service_url="http://127.0.0.1:9",
            bootstrap_token="unused",
        )
        for _ in range(args.workers)
    ]
    processes = sum(entry.isdigit() for entry in os.listdir("/proc"))
    handles = []
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        for spec in specs:
            handles.append(provisioner.create(spec))
        create = (time.process_time() - cpu, time.perf_counter() - wall)
        cpu, wall = time.process_time(), time.perf_counter()
        provisioner.destroy_many(handles)
        destroy = (time.process_time() - cpu, time.perf_counter() - wall)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = args.workers
    print(
        f"{processes} processes on the host; per worker: "
        f"create CPU {1000 * create[0] / n:.2f} ms (wall {1000 * create[1] / n:.1f}), "
        f"destroy CPU {1000 * destroy[0] / n:.2f} ms (wall {1000 * destroy[1] / n:.1f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
