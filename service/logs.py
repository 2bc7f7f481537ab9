"""One log format for every process: logfmt lines, ``key=value`` after a fixed prefix.

The service logs ``event key=value ...`` messages (``worker_created pool=p worker=w``);
this formatter turns each record into one line with a timestamp, level, logger and
process id (``proc``: messages use ``pid`` for other processes) in front::

    ts=2026-01-01T12:00:00.123Z level=info logger=workerlease.workers proc=41
    event=worker_created pool=p worker=w      (one line in the log)

The web workers, the scheduler and gunicorn's own error and access logs all use it
(:class:`GunicornLogger`), so one parser reads every line. A message that is not in
the event form (a library's sentence) becomes ``event=log msg="..."``; a traceback
becomes ``exc="..."`` with its newlines escaped, so a line is always one event.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

from gunicorn.glogging import Logger as _GunicornBase

_EVENT = re.compile(r"^([a-z][a-z0-9_.]*)(?:[:;,]?\s+(.*))?$", re.DOTALL)
_KEY_VALUE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")
_BARE = re.compile(r"^[^\s\"=\\]+$")


def quote(value: object) -> str:
    """A logfmt value: bare when it can be, else double-quoted with escapes."""
    text = str(value)
    if text and _BARE.match(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped.replace("\r", "\\r").replace("\t", "\\t") + '"'


def event_fields(message: str) -> str:
    """``event=... rest`` for a service message, ``event=log msg="..."`` otherwise."""
    match = _EVENT.match(message)
    if match:
        name, rest = match.group(1), (match.group(2) or "").strip()
        if "_" in name or not rest or _KEY_VALUE.match(rest):
            if "\n" in rest:
                rest = f"detail={quote(rest)}"
            return f"event={name}" + (f" {rest}" if rest else "")
    return f"event=log msg={quote(message)}"


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f"ts={stamp}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
            f"logger={record.name} proc={record.process} {event_fields(record.getMessage())}"
        )
        if record.exc_info:
            line += f" exc={quote(self.formatException(record.exc_info))}"
        elif record.stack_info:
            line += f" stack={quote(record.stack_info)}"
        return line


def configure(level: str) -> None:
    """Every record of this process to stderr as logfmt (``serve`` and ``scheduler``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # Request lines come from gunicorn's access log; keep library chatter down.
    # "maximum number of running instances reached" is expected for the frequent demand job.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)


class GunicornLogger(_GunicornBase):
    """gunicorn's error and access logs in the same format (``logger_class``).

    The access line is ``event=http_request`` with method, path (no query string),
    status, bytes, duration and the client; never headers, so never a token.
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(LogfmtFormatter())

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if not self.cfg.accesslog:
            return
        duration_ms = request_time.total_seconds() * 1000
        self.access_log.info(
            "http_request method=%s path=%s status=%s bytes=%s duration_ms=%.1f remote=%s",
            quote(environ.get("REQUEST_METHOD", "-")),
            quote(environ.get("PATH_INFO", "-") or "/"),
            getattr(resp, "status_code", "-"),
            getattr(resp, "sent", 0) or 0,
            duration_ms,
            quote(environ.get("REMOTE_ADDR", "-")),
        )
