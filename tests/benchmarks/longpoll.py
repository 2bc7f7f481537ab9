"""Long polls and slow clients against a real ``workerlease serve`` (issue 10).

1. **Long polls.** W tenants each hold ``POST /v1/leases {"pool": "scarce",
   "wait_seconds": 60}`` on a connection of their own, from a separate process
   (asyncio); while the lease stays pending they go on with ``GET
   /v1/leases/<id>?wait_seconds=60``, as a client would, so W waits stay held.
   ``scarce`` has ``max_workers: 1``: every lease but one stays pending. While they
   wait, 8 clients run warm lease cycles on the ``bench`` pool, refilled between
   bursts: a refill needs the agents' ready callbacks, so one that completes shows
   the callbacks still land. The same warm figures without waits are taken first.
2. **Slow clients.** S sockets send the start of a request and never finish their
   headers. ``/healthz`` is timed while they are open; then each socket is watched
   until the server closes it (the header timeout).

Every connection goes to 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.benchmarks import drivers
from tests.benchmarks.common import LoadResult, run_load, summarize
from tests.benchmarks.warm import MARGIN, BenchServer
from tests.support.server import pool, wait_until

WARM_POOL = "bench"
SCARCE_POOL = "scarce"
WARM_CLIENTS = 8
HEADER_TIMEOUT_S = 5  # service.server.HEADER_TIMEOUT_S


def _request(method: str, path: str, token: str, body: bytes = b"") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _answer(reader: asyncio.StreamReader, stop_at: float) -> tuple[int, bytes]:
    head = await asyncio.wait_for(
        reader.readuntil(b"\r\n\r\n"), timeout=max(1.0, stop_at - time.monotonic())
    )
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    body = await reader.readexactly(int(length.group(1)) if length else 0)
    return int(head.split(b" ", 2)[1]), body


async def _hold_one(port: int, token: str, stop_at: float, out: dict[str, int]) -> None:
    """POST a lease that waits; while it stays pending, long-poll it with GET ?wait_seconds."""
    body = json.dumps({"pool": SCARCE_POOL, "wait_seconds": 60}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out["connected"] += 1
    request = _request("POST", "/v1/leases", token, body)
    try:
        while time.monotonic() < stop_at:
            writer.write(request)
            await writer.drain()
            status, answer = await _answer(reader, stop_at)
            out[f"status_{status}"] = out.get(f"status_{status}", 0) + 1
            lease = json.loads(answer)
            if status not in (200, 202) or lease.get("state") != "pending":
                await asyncio.sleep(max(0.0, stop_at - time.monotonic()))  # served: hold on
                return
            request = _request("GET", f"/v1/leases/{lease['id']}?wait_seconds=60", token)
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
        out[type(exc).__name__] = out.get(type(exc).__name__, 0) + 1
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _holder(port: int, tokens: list[str], seconds: float, result_q: Any) -> None:
    """A process that holds one waiting request per token for ``seconds``."""

    async def main() -> dict[str, int]:
        out: dict[str, int] = {"connected": 0}
        stop_at = time.monotonic() + seconds
        tasks = []
        for token in tokens:
            tasks.append(asyncio.create_task(_hold_one(port, token, stop_at, out)))
            await asyncio.sleep(0.002)  # connect at a modest rate
        await asyncio.gather(*tasks, return_exceptions=True)
        return out

    result_q.put(asyncio.run(main()))


def _metric(server: BenchServer, name: str) -> float:
    text = server.request("GET", "/metrics").text
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _time_healthz(port: int, count: int) -> dict[str, float]:
    conn = drivers.NoDelayHTTPConnection("127.0.0.1", port, timeout=60)
    seconds = []
    try:
        for _ in range(count):
            t0 = time.monotonic()
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            seconds.append(time.monotonic() - t0)
    finally:
        conn.close()
    return summarize(seconds)


def _warm_bursts(server: BenchServer, tokens: list[str], ready: int, bursts: int) -> LoadResult:
    params = {"port": server.port, "pool": WARM_POOL, "tokens": tokens}
    iterations = max(1, (ready - MARGIN) // WARM_CLIENTS)
    parts = []
    for _ in range(bursts):
        server.wait_full(ready)  # the refill: agents' ready callbacks must land
        parts.append(run_load(drivers.SERVICE_HTTP, params, WARM_CLIENTS, iterations))
    return LoadResult.merge(parts)


def run_longpoll(waits: int, ready: int, bursts: int, log: Any) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="wl-bench-longpoll-"))
    server = BenchServer(
        tmp,
        pools=[
            pool(WARM_POOL, min_ready=ready, max_workers=ready),
            pool(SCARCE_POOL, min_ready=0, max_workers=1),
        ],
    )
    out: dict[str, Any] = {"waits_requested": waits, "ready_workers": ready}
    try:
        server.start(timeout=90)
        warm_tokens = [server.create_tenant(f"warm-{i}")["token"] for i in range(WARM_CLIENTS)]
        run_load(
            drivers.SERVICE_HTTP,
            {"port": server.port, "pool": WARM_POOL, "tokens": warm_tokens},
            4,
            2,
        )
        quiet = _warm_bursts(server, warm_tokens, ready, bursts)
        out["warm_without_waits"] = quiet.as_dict()
        log(f"  warm lease, no waits: p99 {quiet.as_dict()['acquire']['p99_ms']} ms")
        # One more than W: the scarce pool's one worker serves one of them.
        wait_tokens = [server.create_tenant(f"wait-{i}")["token"] for i in range(waits + 1)]
        out.update(_under_waits(server, warm_tokens, wait_tokens, ready, bursts, log))
    finally:
        server.close()
    return out


def _under_waits(
    server: BenchServer,
    warm_tokens: list[str],
    wait_tokens: list[str],
    ready: int,
    bursts: int,
    log: Any,
) -> dict[str, Any]:
    waits = len(wait_tokens) - 1  # one of them gets the scarce pool's worker
    ctx = mp.get_context("spawn")
    result_q = ctx.Queue()
    hold_s = 120.0
    holder = ctx.Process(
        target=_holder, args=(server.port, wait_tokens, hold_s, result_q), daemon=True
    )
    started = time.monotonic()
    holder.start()
    out: dict[str, Any] = {}
    try:
        wait_until(
            lambda: _metric(server, "workerlease_waiting_requests") >= waits,
            90,
            interval=1,
            message=lambda: f"waits never reached {waits}",
        )
        out["waits_reached_after_s"] = round(time.monotonic() - started, 1)
        samples = [_metric(server, "workerlease_waiting_requests")]
        out["healthz_under_waits"] = _time_healthz(server.port, 200)
        samples.append(_metric(server, "workerlease_waiting_requests"))
        loaded = _warm_bursts(server, warm_tokens, ready, bursts)
        samples.append(_metric(server, "workerlease_waiting_requests"))
        out["warm_under_waits"] = loaded.as_dict()
        out["waits_held_min"] = int(min(samples))
        log(
            f"  {int(min(samples))} waits held; warm lease p99 "
            f"{loaded.as_dict()['acquire']['p99_ms']} ms, healthz p99 "
            f"{out['healthz_under_waits']['p99_ms']} ms"
        )
    finally:
        holder.join(hold_s + 60)
        if holder.is_alive():
            holder.kill()
        with contextlib.suppress(Exception):
            out["holder"] = result_q.get(timeout=5)
    return out


def run_slow_clients(sockets: int, log: Any) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="wl-bench-slow-"))
    server = BenchServer(tmp, pools=[pool(WARM_POOL, min_ready=0, max_workers=1)])
    out: dict[str, Any] = {"sockets": sockets, "header_timeout_s": HEADER_TIMEOUT_S}
    held: list[tuple[socket.socket, float]] = []
    try:
        server.start(timeout=90)
        out["healthz_quiet"] = _time_healthz(server.port, 200)
        partial = b"POST /v1/workers/w-0000000000000000000a/ready HTTP/1.1\r\nHost: x\r\n"
        for _ in range(sockets):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            sock.sendall(partial)
            held.append((sock, time.monotonic()))
        out["healthz_under_slow_clients"] = _time_healthz(server.port, 200)
        dropped_after = []
        for sock, opened in held:
            sock.settimeout(max(1.0, opened + 60 - time.monotonic()))
            with contextlib.suppress(OSError):
                while sock.recv(4096):
                    pass
                dropped_after.append(time.monotonic() - opened)
        out["dropped"] = len(dropped_after)
        out["dropped_after"] = summarize(dropped_after)
        log(
            f"  {sockets} slow clients: healthz p99 "
            f"{out['healthz_under_slow_clients']['p99_ms']} ms (quiet "
            f"{out['healthz_quiet']['p99_ms']} ms); {len(dropped_after)} dropped, median after "
            f"{out['dropped_after']['p50_ms'] / 1000:.1f} s"
        )
    finally:
        for sock, _ in held:
            sock.close()
        server.close()
    return out
