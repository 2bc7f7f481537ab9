"""Heartbeats: a process that must be running somewhere writes one; readiness reads it."""

from __future__ import annotations

import os
import socket
from datetime import datetime

from sqlmodel import Session

from service.models import Heartbeat

SCHEDULER = "scheduler"


def beat(session: Session, name: str, now: datetime) -> None:
    row = session.get(Heartbeat, name) or Heartbeat(name=name)
    row.at = now
    row.detail = f"{socket.gethostname()}:{os.getpid()}"
    session.add(row)


def last_beat(session: Session, name: str) -> Heartbeat | None:
    return session.get(Heartbeat, name)
