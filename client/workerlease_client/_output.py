"""What ``wl`` prints for people: aligned tables, field lists, a progress line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from workerlease_client.models import LeaseInfo, TaskInfo


def timestamp(value: datetime | None) -> str:
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def duration(seconds: int) -> str:
    """In the config's own units: ``72h``, ``60m``, ``90s``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Columns as wide as their widest cell, two spaces apart."""
    columns = zip(headers, *rows, strict=False)
    widths = [max(len(str(cell)) for cell in column) for column in columns]
    for row in [list(headers), *rows]:
        line = "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write(line.rstrip() + "\n")


def fields(pairs: Sequence[tuple[str, str]], out: TextIO) -> None:
    width = max(len(key) for key, _ in pairs)
    for key, value in pairs:
        out.write(f"{key.ljust(width)}  {value}\n")


def emit_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def show_lease(lease: LeaseInfo, out: TextIO) -> None:
    worker = lease.worker
    fields(
        [
            ("id", lease.id),
            ("pool", lease.pool),
            ("state", lease.state),
            ("created", timestamp(lease.created_at)),
            ("activated", timestamp(lease.activated_at)),
            ("idle expires", timestamp(lease.idle_expires_at)),
            ("expires", timestamp(lease.expires_at)),
            ("ended", timestamp(lease.ended_at)),
            ("end reason", lease.end_reason or "-"),
            ("worker", worker.id if worker else "-"),
            ("agent url", (worker.agent_url if worker else None) or "-"),
        ],
        out,
    )


def show_task(task: TaskInfo, out: TextIO) -> None:
    fields(
        [
            ("id", task.id),
            ("lease", task.lease_id),
            ("state", task.state),
            ("exit code", "-" if task.exit_code is None else str(task.exit_code)),
            ("error", task.error or "-"),
            ("image", task.image or "-"),
            ("created", timestamp(task.created_at)),
            ("started", timestamp(task.started_at)),
            ("finished", timestamp(task.finished_at)),
            ("log bytes", "-" if task.log_bytes is None else str(task.log_bytes)),
        ],
        out,
    )


class Progress:
    """While waiting for a worker, one status line on a terminal; nothing otherwise."""

    def __init__(self, stream: TextIO, pool: str) -> None:
        self.stream = stream
        self.pool = pool
        self.active = stream.isatty()
        self.shown = False

    @property
    def poll(self) -> int:
        return 2 if self.active else 60  # a terminal's line is refreshed every 2 s

    def __call__(self, lease: LeaseInfo, waited: float) -> None:
        if not self.active:
            return
        self.stream.write(
            f"\r\x1b[Kwaiting for a worker in {self.pool}: lease {lease.id} {lease.state}, "
            f"{int(waited)} s"
        )
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False
