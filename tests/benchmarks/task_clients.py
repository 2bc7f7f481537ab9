"""Simulated agents and tenants for the tasks benchmark (``tests.benchmarks.tasks``).

Each ``run_*`` function is the body of a ``spawn``-ed process: it speaks the task
protocol of docs/tasks.md to one ``serve`` on 127.0.0.1 until the harness sets
``stop`` or ``seconds`` pass, then puts its figures on ``result_q`` (before it closes
its connections: closing a thousand of them can take longer than the harness waits). Many
connections (idle polls, log producers, log followers) are asyncio coroutines, one
connection each; the few sequential ones (dispatch, the log flood) are threads with
``http.client``. Times are ``time.monotonic()``, system-wide on Linux, so the
harness can compare them with its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.benchmarks import drivers

POLL_WAIT_S = 20
FOLLOW_WAIT_S = 30
LINE_EVERY_S = 0.5


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Conn:
    """One keep-alive HTTP/1.1 connection; a call reconnects once if the server closed it."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.token = token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        content_type: str = "application/json",
        timeout: float = 60.0,
    ) -> Reply:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {self.token}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        for attempt in (1, 2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                self.writer.write(head + body)
                await self.writer.drain()
                return await asyncio.wait_for(self._reply(), timeout)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _reply(self) -> Reply:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Reply(int(lines[0].split(" ", 2)[1]), headers, body)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _until_stopped(
    coros: list[Any], stop: Any, seconds: float, report: Callable[[], None]
) -> None:
    """Run the coroutines until ``stop`` is set or ``seconds`` pass, ``report`` the figures,
    then cancel them."""
    tasks = [asyncio.create_task(c) for c in coros]
    await asyncio.get_running_loop().run_in_executor(None, stop.wait, seconds)
    report()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _count_error(out: Counter[str], exc: BaseException) -> None:
    out[type(exc).__name__] += 1


# ---- idle agents: long polls -----------------------------------------------------


async def _poll_forever(port: int, worker_id: str, token: str, out: Counter[str]) -> None:
    conn = Conn(port, token)
    body = json.dumps({"running": [], "wait_seconds": POLL_WAIT_S}).encode()
    try:
        while True:
            t0 = time.monotonic()
            try:
                reply = await conn.call(
                    "POST", f"/v1/workers/{worker_id}/poll", body, timeout=POLL_WAIT_S + 30
                )
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                _count_error(out, exc)
                await asyncio.sleep(1)
                continue
            out[f"status_{reply.status}"] += 1
            if reply.status != 200:
                await asyncio.sleep(1)
            elif json.loads(reply.body) != {"tasks": [], "cancel": []}:
                out["unexpected_work"] += 1
            elif time.monotonic() - t0 < POLL_WAIT_S - 1:
                out["answered_early"] += 1
    finally:
        conn.close()


def run_pollers(
    port: int, agents: list[tuple[str, str]], seconds: float, stop: Any, result_q: Any
) -> None:
    """One long poll per ``(worker id, worker token)``, again as soon as it is answered."""

    async def main() -> None:
        out: Counter[str] = Counter()

        async def staggered(i: int, worker_id: str, token: str) -> None:
            await asyncio.sleep(i * 0.003)  # connect at a modest rate
            await _poll_forever(port, worker_id, token, out)

        coros = [staggered(i, w, t) for i, (w, t) in enumerate(agents)]
        await _until_stopped(coros, stop, seconds, lambda: result_q.put(("pollers", dict(out))))

    asyncio.run(main())


# ---- running tasks: agents sending lines, tenants following ----------------------


async def _produce(
    port: int, run: dict[str, str], phase: float, out: Counter[str], sent: list[int]
) -> None:
    """One timestamped line every LINE_EVERY_S, sent at once from the acknowledged offset."""
    conn = Conn(port, run["worker_token"])
    path = f"/v1/workers/{run['worker_id']}/tasks/{run['task_id']}/log?offset="
    unsent, acked, seq = b"", 0, 0
    start = time.monotonic() + phase
    try:
        while True:
            await asyncio.sleep(max(0.0, start + seq * LINE_EVERY_S - time.monotonic()))
            unsent += f"{seq:09d} {time.monotonic():.6f} bench output line\n".encode()
            seq += 1
            try:
                reply = await conn.call(
                    "POST", f"{path}{acked}", unsent, "application/octet-stream", timeout=60
                )
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                _count_error(out, exc)
                continue
            out[f"status_{reply.status}"] += 1
            if reply.status != 200:
                continue
            ack = json.loads(reply.body)
            received = int(ack["received"])
            unsent, acked = unsent[max(0, received - acked) :], received
            sent[0] += 1
            if ack["cancel"]:
                out["cancelled"] += 1
                return
    finally:
        conn.close()


def run_producers(
    port: int, runs: list[dict[str, str]], seconds: float, stop: Any, result_q: Any
) -> None:
    async def main() -> None:
        out: Counter[str] = Counter()
        sent = [0]
        coros = [_produce(port, r, random.uniform(0, LINE_EVERY_S), out, sent) for r in runs]

        def report() -> None:
            result_q.put(("producers", {**out, "lines_acknowledged": sent[0]}))

        await _until_stopped(coros, stop, seconds, report)

    asyncio.run(main())


@dataclass
class FollowFigures:
    samples: list[tuple[float, float]] = field(default_factory=list)  # (arrived, latency)
    lost: int = 0
    repeated: int = 0
    reads: int = 0
    empty_reads: int = 0


async def _follow(port: int, run: dict[str, str], out: Counter[str], fig: FollowFigures) -> None:
    """GET the log from X-Next-Offset again and again; every whole line gives a latency."""
    conn = Conn(port, run["tenant_token"])
    path = f"/v1/leases/{run['lease_id']}/tasks/{run['task_id']}/log"
    offset, partial, expect = 0, b"", 0
    try:
        while True:
            try:
                reply = await conn.call(
                    "GET",
                    f"{path}?offset={offset}&wait_seconds={FOLLOW_WAIT_S}",
                    timeout=FOLLOW_WAIT_S + 30,
                )
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                _count_error(out, exc)
                await asyncio.sleep(1)
                continue
            arrived = time.monotonic()
            out[f"status_{reply.status}"] += 1
            if reply.status != 200:
                await asyncio.sleep(1)
                continue
            fig.reads += 1
            fig.empty_reads += not reply.body
            offset = int(reply.headers["x-next-offset"])
            *lines, partial = (partial + reply.body).split(b"\n")
            for line in lines:
                seq_text, stamp, _ = line.split(b" ", 2)
                seq = int(seq_text)
                if seq > expect:
                    fig.lost += seq - expect
                elif seq < expect:
                    fig.repeated += 1
                expect = seq + 1
                fig.samples.append((arrived, arrived - float(stamp)))
    finally:
        conn.close()


def run_followers(
    port: int, runs: list[dict[str, str]], seconds: float, stop: Any, result_q: Any
) -> None:
    out: Counter[str] = Counter()
    fig = FollowFigures()

    def report() -> None:
        figures = {
            **out,
            "samples": list(fig.samples),
            "lost": fig.lost,
            "repeated": fig.repeated,
            "reads": fig.reads,
            "empty_reads": fig.empty_reads,
        }
        result_q.put(("followers", figures))

    coros = [_follow(port, r, out, fig) for r in runs]
    asyncio.run(_until_stopped(coros, stop, seconds, report))


# ---- dispatch: submit -> the agent has it ------------------------------------------


# serve closes a keep-alive connection idle this long (service.server.HEADER_TIMEOUT_S).
KEEPALIVE_S = 5


class _Client:
    """Blocking keep-alive client for the sequential parts."""

    def __init__(self, port: int, token: str) -> None:
        self.conn = drivers.NoDelayHTTPConnection("127.0.0.1", port, timeout=60)
        self.token = token
        self.used = time.monotonic()

    def call(
        self, method: str, path: str, body: bytes = b"", content_type: str = "application/json"
    ) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": content_type}
        if time.monotonic() - self.used > KEEPALIVE_S - 1:
            self.conn.close()  # the server may have closed it: a new one, not a reset
        self.used = time.monotonic()
        try:
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            answer = response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()  # reconnects on the next request
            raise
        self.used = time.monotonic()
        return answer

    def close(self) -> None:
        self.conn.close()


def _dispatch_agent(
    port: int, run: dict[str, str], got: dict[str, float], polling: threading.Event, stop: Any
) -> None:
    """Poll; note when each task arrives; finish it at once (exit 0, no output)."""
    client = _Client(port, run["worker_token"])
    base = f"/v1/workers/{run['worker_id']}"
    body = json.dumps({"running": [], "wait_seconds": POLL_WAIT_S}).encode()
    finish = json.dumps({"outcome": "exited", "exit_code": 0, "log_bytes": 0}).encode()
    try:
        while not stop.is_set():
            polling.set()
            status, answer = client.call("POST", f"{base}/poll", body)
            arrived = time.monotonic()
            polling.clear()
            if status != 200:
                raise RuntimeError(f"poll: {status} {answer[:200]!r}")
            for task in json.loads(answer)["tasks"]:
                got[task["id"]] = arrived
                status, answer = client.call("POST", f"{base}/tasks/{task['id']}/finish", finish)
                if status != 200:
                    raise RuntimeError(f"finish: {status} {answer[:200]!r}")
    finally:
        client.close()


def run_dispatch(
    port: int, run: dict[str, str], samples: int, bound_s: float, result_q: Any
) -> None:
    """``samples`` submits, one at a time, each while the agent waits in its poll; no
    new one after ``bound_s`` (an overloaded server answers slowly)."""
    got: dict[str, float] = {}
    polling, stop = threading.Event(), threading.Event()
    agent = threading.Thread(
        target=_dispatch_agent, args=(port, run, got, polling, stop), daemon=True
    )
    agent.start()
    tenant = _Client(port, run["tenant_token"])
    script = json.dumps({"script": "true"}).encode()
    dispatch, submit, errors = [], [], Counter[str]()
    give_up = time.monotonic() + bound_s
    try:
        for _ in range(samples):
            if time.monotonic() > give_up:
                errors["out_of_time"] += 1
                break
            # The agent is back in its poll, and the request has reached the server.
            if not polling.wait(10) or not agent.is_alive():
                errors["agent_not_polling"] += 1
                break
            time.sleep(0.1)
            t0 = time.monotonic()
            status, answer = tenant.call("POST", f"/v1/leases/{run['lease_id']}/tasks", script)
            submit.append(time.monotonic() - t0)
            if status != 201:
                errors[f"submit_{status}"] += 1
                continue
            task_id = json.loads(answer)["id"]
            deadline = time.monotonic() + 10
            while task_id not in got and time.monotonic() < deadline:
                time.sleep(0.002)
            if task_id in got:
                dispatch.append(got[task_id] - t0)
            else:
                errors["never_dispatched"] += 1
    except (OSError, http.client.HTTPException) as exc:
        errors[type(exc).__name__] += 1  # what was measured until then is still reported
    finally:
        stop.set()
        tenant.close()
        agent.join(POLL_WAIT_S + 10)
    result_q.put(("dispatch", {"dispatch": dispatch, "submit": submit, **errors}))


# ---- the log flood: one task's output as fast as it goes -------------------------

CHUNK = 1 << 20


def _block() -> bytes:
    line = b"flood output line, as fast as the task prints it ........................\n"
    return (line * (CHUNK // len(line) + 1))[:CHUNK]


def _flood_one(client: _Client, run: dict[str, str], total: int) -> dict[str, Any]:
    """Send up to ``total`` bytes in 1 MiB chunks from ``received``; stop when told to
    discard (the log is capped) or cancel, as the protocol allows."""
    block = _block()
    path = f"/v1/workers/{run['worker_id']}/tasks/{run['task_id']}/log?offset="
    acked, chunks, posts, discard = 0, 0, [], False
    start = time.monotonic()
    while acked < total:
        size = min(CHUNK, total - acked)
        skew = acked % CHUNK  # the stream is the block repeated
        body = (block[skew:] + block[:skew])[:size]
        t0 = time.monotonic()
        status, answer = client.call("POST", f"{path}{acked}", body, "application/octet-stream")
        posts.append(time.monotonic() - t0)
        if status != 200:
            raise RuntimeError(f"log chunk: {status} {answer[:200]!r}")
        ack = json.loads(answer)
        acked, chunks = int(ack["received"]), chunks + 1
        if ack["discard"] or ack["cancel"]:
            discard = bool(ack["discard"])
            break
    elapsed = time.monotonic() - start
    return {
        "received_bytes": acked,
        "chunks": chunks,
        "elapsed_s": elapsed,
        "discard": discard,
        "start": start,
        "post_s": posts,
    }


def run_flood(
    port: int, runs: list[dict[str, str]], total: int, go: Any, stop: Any, result_q: Any
) -> None:
    """Task after task (each its own stream of ``total`` bytes) until ``stop``: the first
    is the figure; the rest keep the flood going while the warm lease is measured."""
    out: dict[str, Any] = {"tasks": []}
    try:
        go.wait(120)
        for run in runs:
            if stop.is_set():
                break
            client = _Client(port, run["worker_token"])
            try:
                out["tasks"].append({"task_id": run["task_id"], **_flood_one(client, run, total)})
            finally:
                client.close()
        out["end"] = time.monotonic()
    except Exception as exc:  # reported to the harness, which fails the section
        out["error"] = f"{type(exc).__name__}: {exc}"[:300]
    with contextlib.suppress(Exception):
        result_q.put(("flood", out))
