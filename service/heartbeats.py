"""Heartbeats: a process that must be running somewhere writes one; readiness reads it."""

from __future__ import annotations

import os
import socket
from datetime import datetime

from sqlmodel import Session

from service.models import Heartbeat

SCHEDULER = "scheduler"
STOPPED = "stopped"


def beat(session: Session, name: str, now: datetime) -> None:
    row = session.get(Heartbeat, name) or Heartbeat(name=name)
    row.at = now
    row.detail = f"{socket.gethostname()}:{os.getpid()}"
    session.add(row)


def last_beat(session: Session, name: str) -> Heartbeat | None:
    return session.get(Heartbeat, name)


def stopped(session: Session, name: str, now: datetime) -> None:
    """The process stopped cleanly: its last beat says so (``workerlease cleanup`` reads it)."""
    row = session.get(Heartbeat, name) or Heartbeat(name=name)
    row.at = now
    row.detail = STOPPED
    session.add(row)


def running_elsewhere(beat: Heartbeat | None, now: datetime, stale_after_s: float) -> bool:
    """A beat recent enough that its process may still run (and did not say it stopped)."""
    if beat is None or beat.detail == STOPPED:
        return False
    return (now - beat.at).total_seconds() <= stale_after_s
