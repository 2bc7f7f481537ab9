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

``log_format: json`` makes the same fields one JSON object per line instead
(:class:`JsonFormatter`). Every line logged while a request is handled, and its access
line, carries that request's ``request_id`` (:class:`RequestIds`): a context variable,
so per greenlet under gunicorn's gevent worker and per thread elsewhere.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from gunicorn.glogging import Logger as _GunicornBase

_EVENT = re.compile(r"^([a-z][a-z0-9_.]*)(?:[:;,]?\s+(.*))?$", re.DOTALL)
_KEY_VALUE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")
_BARE = re.compile(r"^[^\s\"=\\]+$")
# key=value, the value bare, "double-quoted" (quote()) or 'single-quoted' (a %r).
_PAIR = re.compile(r"""([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\S*)\s*""")
# An X-Request-Id a client sent is kept only when it cannot forge or break a line.
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
REQUEST_ID_ENVIRON = "workerlease.request_id"

REQUEST_ID: ContextVar[str | None] = ContextVar("workerlease_request_id", default=None)


def quote(value: object) -> str:
    """A logfmt value: bare when it can be, else double-quoted with escapes."""
    text = str(value)
    if text and _BARE.match(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped.replace("\r", "\\r").replace("\t", "\\t") + '"'


def _split_event(message: str) -> tuple[str, str] | None:
    """``(event, rest)`` for a service message (``event key=value ...``), else None."""
    match = _EVENT.match(message)
    if match:
        name, rest = match.group(1), (match.group(2) or "").strip()
        if "_" in name or not rest or _KEY_VALUE.match(rest):
            return name, rest
    return None


def event_fields(message: str) -> str:
    """``event=... rest`` for a service message, ``event=log msg="..."`` otherwise."""
    event = _split_event(message)
    if event is None:
        return f"event=log msg={quote(message)}"
    name, rest = event
    if "\n" in rest:
        rest = f"detail={quote(rest)}"
    return f"event={name}" + (f" {rest}" if rest else "")


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t"}


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), value[1:-1])
    return value


def _request_id(record: logging.LogRecord) -> str | None:
    # The access line names its request explicitly; other lines read the context.
    explicit: str | None = getattr(record, "request_id", None)
    return explicit or REQUEST_ID.get()


def _stamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
        f".{int(record.msecs):03d}Z"
    )


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"ts={_stamp(record)} level={record.levelname.lower()} "
            f"logger={record.name} proc={record.process} {event_fields(record.getMessage())}"
        )
        request_id = _request_id(record)
        if request_id:
            line += f" request_id={quote(request_id)}"
        if record.exc_info:
            line += f" exc={quote(self.formatException(record.exc_info))}"
        elif record.stack_info:
            line += f" stack={quote(record.stack_info)}"
        return line


def parse_fields(text: str) -> dict[str, str]:
    """The ``key=value`` pairs of an event's rest; text that is not one becomes ``msg``."""
    fields: dict[str, str] = {}
    leftover: list[str] = []
    position = 0
    while position < len(text):
        match = _PAIR.match(text, position)
        if match is None:
            end = text.find(" ", position)
            end = len(text) if end < 0 else end + 1
            leftover.append(text[position:end].strip())
            position = end
            continue
        fields[match.group(1)] = _unquote(match.group(2))
        position = match.end()
    if leftover:
        fields["msg"] = " ".join(part for part in leftover if part)
    return fields


class JsonFormatter(logging.Formatter):
    """The logfmt line's fields as one JSON object per line (``log_format: json``)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _stamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "proc": record.process,
        }
        message = record.getMessage()
        event = _split_event(message)
        if event is None:
            line.update(event="log", msg=message)
        else:
            name, rest = event
            fields = parse_fields(rest) if "\n" not in rest else {"detail": rest}
            line["event"] = name
            line.update({k: v for k, v in fields.items() if k not in line})
        request_id = _request_id(record)
        if request_id:
            line["request_id"] = request_id
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=False, default=str)


_FORMATTERS: dict[str, type[logging.Formatter]] = {
    "text": LogfmtFormatter,
    "json": JsonFormatter,
}
_format = "text"


def formatter() -> logging.Formatter:
    """The formatter this process was configured with (:func:`configure`)."""
    return _FORMATTERS[_format]()


def configure(level: str, log_format: str = "text") -> None:
    """Every record of this process to stderr, as logfmt or JSON lines (``serve`` and
    ``scheduler``; gunicorn's logs, set up after this, follow the same format)."""
    global _format
    _format = log_format
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter())
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
                handler.setFormatter(formatter())

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
            extra={"request_id": environ.get(REQUEST_ID_ENVIRON)},
        )


class RequestIds:
    """WSGI middleware: every request gets an id, its client's ``X-Request-Id`` when
    sane, else a new one; it is answered in ``X-Request-Id``, put in the WSGI environ
    (for the access line) and set in :data:`REQUEST_ID` while the application runs,
    while a streamed body is produced and while it is closed, and at no other time:
    nothing leaks to the next request of a thread or greenlet."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        offered = environ.get("HTTP_X_REQUEST_ID", "")
        request_id = offered if _SANE_REQUEST_ID.match(offered) else uuid.uuid4().hex
        environ[REQUEST_ID_ENVIRON] = request_id

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers.append(("X-Request-Id", request_id))
            return start_response(status, headers, exc_info)

        token = REQUEST_ID.set(request_id)
        try:
            body = self.app(environ, start)
        finally:
            REQUEST_ID.reset(token)
        return _Body(body, request_id)


class _Body:
    """A response body produced and closed under its request's id."""

    def __init__(self, body: Iterable[bytes], request_id: str) -> None:
        self._body = body
        self._request_id = request_id

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self._body)
        while True:
            token = REQUEST_ID.set(self._request_id)
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            finally:
                REQUEST_ID.reset(token)
            yield chunk

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            token = REQUEST_ID.set(self._request_id)
            try:
                close()
            finally:
                REQUEST_ID.reset(token)
