"""Figure 4: time to worker from an empty pool, against starting the same agent directly.

Service: ``serve`` with ``min_ready: 0`` pools (``local``, and ``docker`` when the
engine answers); a tenant calls ``POST /v1/leases`` with ``wait_seconds`` and the
clock stops when the answer says ``active``. Between samples the harness waits
until the released worker is destroyed.

Direct: the harness starts the same agent itself (a process with the agent's
environment, or a ``docker run`` of the same image on the host network, through the
Docker SDK as the provisioner does) pointed at a tiny callback server of its own,
and the clock stops when the agent's ready callback arrives.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.benchmarks.common import ratio
from tests.benchmarks.warm import BenchServer
from tests.support.server import pool

IMAGE = "workerlease/testing:0.1.0"


class _Callbacks(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.arrived: dict[str, float] = {}
        self.event = threading.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def wait_for(self, worker_id: str, timeout: float) -> float:
        with self.event:
            self.event.wait_for(lambda: worker_id in self.arrived, timeout)
        if worker_id not in self.arrived:
            raise TimeoutError(f"no ready callback from {worker_id}")
        return self.arrived[worker_id]


class _Handler(BaseHTTPRequestHandler):
    server: _Callbacks

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(length)
        worker_id = self.path.split("/")[3]
        at = time.monotonic()
        body = json.dumps({"access_token": "wla_direct"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with self.server.event:
            self.server.arrived[worker_id] = at
            self.server.event.notify_all()

    def log_message(self, *args: Any) -> None:
        pass


def _agent_env(callbacks: _Callbacks, worker_id: str, deployment: str) -> dict[str, str]:
    return {
        "WORKERLEASE_URL": callbacks.url,
        "WORKERLEASE_WORKER_ID": worker_id,
        "WORKERLEASE_DEPLOYMENT": deployment,
        "WORKERLEASE_POOL": "direct",
        "WORKERLEASE_BOOTSTRAP_TOKEN": "wlb_direct",
        "WORKERLEASE_AGENT_PORT": "0",
        "WORKERLEASE_AGENT_HOST": "127.0.0.1",
    }


def direct_local(samples: int, deployment: str) -> list[float]:
    from provisioners.local import AGENT_FILE

    callbacks = _Callbacks()
    threading.Thread(target=callbacks.serve_forever, daemon=True).start()
    times = []
    try:
        for _ in range(samples):
            worker_id = f"w_direct{uuid.uuid4().hex[:10]}"
            workdir = Path(tempfile.mkdtemp(prefix="wl-bench-direct-"))
            env = {
                "PATH": os.environ.get("PATH", os.defpath),
                "HOME": str(workdir),
                **_agent_env(callbacks, worker_id, deployment),
                "WORKERLEASE_PROVISIONER": "local",
            }
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, str(AGENT_FILE)],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                times.append(callbacks.wait_for(worker_id, 30) - t0)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    finally:
        callbacks.shutdown()
        callbacks.server_close()
    return times


def docker_available() -> bool:
    try:
        import docker

        client = docker.from_env()
        client.images.get(IMAGE)
        client.close()
        return True
    except Exception:  # no SDK, no engine or no image: the docker figures are skipped
        return False


def direct_docker(samples: int, deployment: str) -> list[float]:
    import docker

    client = docker.from_env()
    callbacks = _Callbacks()
    threading.Thread(target=callbacks.serve_forever, daemon=True).start()
    times = []
    try:
        for _ in range(samples):
            worker_id = f"w_direct{uuid.uuid4().hex[:10]}"
            t0 = time.monotonic()
            container = client.containers.run(
                IMAGE,
                detach=True,
                network_mode="host",
                init=True,
                environment=_agent_env(callbacks, worker_id, deployment),
                labels={"workerlease.deployment": deployment, "workerlease.worker": worker_id},
                name=f"wl-bench-{worker_id}",
            )
            try:
                times.append(callbacks.wait_for(worker_id, 60) - t0)
            finally:
                container.remove(force=True)
    finally:
        callbacks.shutdown()
        callbacks.server_close()
        client.close()
    return times


def via_service(samples: int, with_docker: bool, log: Any) -> tuple[dict[str, list[float]], str]:
    pools = [pool("ttw-local", min_ready=0, max_workers=2)]
    if with_docker:
        pools.append(
            pool(
                "ttw-docker",
                min_ready=0,
                max_workers=2,
                provisioner="docker",
                options={"image": IMAGE, "network": "host", "pull": "never"},
            )
        )
    server = BenchServer(Path(tempfile.mkdtemp(prefix="wl-bench-ttw-")), pools=pools)
    times: dict[str, list[float]] = {p["name"]: [] for p in pools}
    rows_to_ready: dict[str, list[float]] = {p["name"]: [] for p in pools}
    try:
        server.start(timeout=60)
        token = server.create_tenant("ttw")["token"]
        for name in times:
            for _ in range(samples):
                _wait_idle(server, name)
                t0 = time.monotonic()
                response = server.request(
                    "POST",
                    "/v1/leases",
                    token=token,
                    json={"pool": name, "wait_seconds": 60},
                    timeout=90,
                )
                elapsed = time.monotonic() - t0
                body = response.json()
                if body.get("state") != "active":
                    raise RuntimeError(f"{name}: lease not active after wait: {body}")
                times[name].append(elapsed)
                rows_to_ready[name].append(_row_to_ready(server, body["worker"]["id"]))
                server.request("DELETE", f"/v1/leases/{body['id']}", token=token)
            log(f"  ttw {name} via service: {[round(t, 3) for t in times[name]]}")
            log(f"  ttw {name} worker row -> ready: {[round(t, 3) for t in rows_to_ready[name]]}")
    finally:
        server.close()
        if with_docker:
            _remove_containers(server.deployment_id)
    return times, rows_to_ready, server.deployment_id


def _row_to_ready(server: BenchServer, worker_id: str) -> float:
    """Seconds from the worker's row (audit event "created") to its agent's ready callback.

    Both timestamps come from the service's clock: the row's is taken when the refill
    plans it, before any provisioner call; the ready one when the callback arrives.
    """
    events = server.admin("GET", "/v1/admin/events?limit=200").json()["events"]
    mine = [e for e in events if e["kind"] == "worker" and e["subject_id"] == worker_id]
    created = min(datetime.fromisoformat(e["at"]) for e in mine if e["from_state"] is None)
    ready = min(datetime.fromisoformat(e["at"]) for e in mine if e["to_state"] == "ready")
    return (ready - created).total_seconds()


def _wait_idle(server: BenchServer, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = server.pool_counts(name)
        if not any(c[k] for k in ("provisioning", "ready", "leased", "destroying")):
            time.sleep(1.0)  # let the scheduler settle into its interval, as in steady state
            return
        time.sleep(0.3)
    raise RuntimeError(f"pool {name} never idle: {server.pool_counts(name)}")


def _remove_containers(deployment: str) -> None:
    with contextlib.suppress(Exception):
        import docker

        client = docker.from_env()
        for container in client.containers.list(
            all=True, filters={"label": f"workerlease.deployment={deployment}"}
        ):
            container.remove(force=True)
        client.close()


def _stats(times: list[float]) -> dict[str, Any]:
    return {
        "n": len(times),
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "max_s": round(max(times), 3),
        "samples_s": [round(t, 3) for t in times],
    }


def run_time_to_worker(samples: int, log: Any) -> dict[str, Any]:
    with_docker = docker_available()
    if not with_docker:
        log("  ttw: Docker engine or image unavailable; docker figures skipped")
    service, rows_to_ready, _ = via_service(samples, with_docker, log)
    deployment = f"bench-direct-{uuid.uuid4().hex[:8]}"
    out: dict[str, Any] = {"docker_available": with_docker}
    direct = {"local": direct_local(samples, deployment)}
    if with_docker:
        try:
            direct["docker"] = direct_docker(samples, deployment)
        finally:
            _remove_containers(deployment)
    for kind, name in (("local", "ttw-local"), ("docker", "ttw-docker")):
        if kind not in direct:
            continue
        s, d = _stats(service[name]), _stats(direct[kind])
        row = _stats(rows_to_ready[name])
        out[kind] = {
            "service": s,
            "direct": d,
            "ratio_median": ratio(s["median_s"], d["median_s"]),
            # Issue 3's measure: worker row created -> ready, against the same direct start.
            "row_to_ready": row,
            "row_to_ready_ratio": ratio(row["median_s"], d["median_s"]),
        }
        log(
            f"  ttw {kind}: service {s['median_s']} s vs direct {d['median_s']} s "
            f"-> {out[kind]['ratio_median']}x; worker row -> ready {row['median_s']} s "
            f"-> {out[kind]['row_to_ready_ratio']}x"
        )
    return out
