"""One log format: every record a logfmt line with ts, level, logger, pid and event."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

from service.logs import (
    REQUEST_ID,
    JsonFormatter,
    LogfmtFormatter,
    RequestIds,
    event_fields,
    quote,
)

LINE = re.compile(
    r"^ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=[a-z]+ logger=\S+ proc=\d+ event=\S+"
)


def _format(message: str, *args: object, exc: bool = False) -> str:
    record = logging.LogRecord("workerlease.test", logging.INFO, __file__, 1, message, args, None)
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            record.exc_info = sys.exc_info()
    return LogfmtFormatter().format(record)


def test_a_service_event_keeps_its_fields() -> None:
    line = _format("worker_created pool=%s worker=%s", "hosted-ubuntu", "w-1")
    assert LINE.match(line)
    assert line.endswith("event=worker_created pool=hosted-ubuntu worker=w-1")


def test_a_sentence_becomes_a_quoted_message() -> None:
    line = _format("Booting worker with pid: %d", 42)
    assert LINE.match(line)
    assert line.endswith('event=log msg="Booting worker with pid: 42"')


def test_a_traceback_stays_on_one_line() -> None:
    line = _format("job_failed job=%s", "maintain", exc=True)
    assert "\n" not in line and LINE.match(line)
    assert "event=job_failed job=maintain exc=" in line and "ValueError: boom" in line


def test_values_are_quoted_only_when_they_must_be() -> None:
    assert quote("w-1") == "w-1"
    assert quote('a "b" c') == '"a \\"b\\" c"'
    assert event_fields("stopped") == "event=stopped"
    assert event_fields("metrics_not_exported: pass --metrics-port").startswith(
        "event=metrics_not_exported"
    )


def _json(message: str, *args: object, request_id: str | None = None) -> dict[str, object]:
    record = logging.LogRecord("workerlease.test", logging.INFO, __file__, 1, message, args, None)
    token = REQUEST_ID.set(request_id)
    try:
        line = JsonFormatter().format(record)
    finally:
        REQUEST_ID.reset(token)
    assert "\n" not in line
    parsed: dict[str, object] = json.loads(line)
    return parsed


def test_json_lines_carry_the_same_fields() -> None:
    line = _json(
        "provision_timeout pool=%s worker=%s reason=%r detail=%s",
        "p",
        "w-1",
        "it did not 'call' back",
        quote('a "quoted" value'),
        request_id="r-1",
    )
    assert {k: line[k] for k in ("level", "logger", "event", "pool", "worker")} == {
        "level": "info",
        "logger": "workerlease.test",
        "event": "provision_timeout",
        "pool": "p",
        "worker": "w-1",
    }
    assert line["reason"] == "it did not 'call' back"
    assert _json("worker_failed reason=%r", "no answer")["reason"] == "no answer"
    assert line["detail"] == 'a "quoted" value'
    assert line["request_id"] == "r-1"
    assert str(line["ts"]).endswith("Z") and isinstance(line["proc"], int)
    assert _json("Booting worker with pid: %d", 7)["msg"] == "Booting worker with pid: 7"
    assert "request_id" not in _json("stopped")


def test_a_logfmt_line_names_the_request_it_was_logged_in() -> None:
    record = logging.LogRecord("workerlease.test", logging.INFO, __file__, 1, "stopped", (), None)
    token = REQUEST_ID.set("abc-123")
    try:
        assert LogfmtFormatter().format(record).endswith("event=stopped request_id=abc-123")
    finally:
        REQUEST_ID.reset(token)
    assert "request_id" not in LogfmtFormatter().format(record)


def _call(environ: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """Run one request through RequestIds: its headers and the id seen inside it."""
    seen: list[str | None] = []
    headers: dict[str, str] = {}

    def stream() -> Iterator[bytes]:
        seen.append(REQUEST_ID.get())  # a streamed body is produced under the id too
        yield b"ok"

    def app(environ: dict[str, str], start_response: Any) -> Iterator[bytes]:
        seen.append(REQUEST_ID.get())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return stream()

    def start_response(
        status: str, response_headers: list[tuple[str, str]], exc: Any = None
    ) -> None:
        headers.update(response_headers)

    body = RequestIds(app)(environ, start_response)
    assert REQUEST_ID.get() is None  # nothing leaks to what the thread does next
    assert list(body) == [b"ok"]
    assert REQUEST_ID.get() is None
    body.close()  # type: ignore[attr-defined]
    assert seen[0] == seen[1] == environ["workerlease.request_id"]
    return headers, seen[0]


def test_a_sane_request_id_is_kept_and_anything_else_replaced() -> None:
    headers, seen = _call({"HTTP_X_REQUEST_ID": "client-id_1.2:3"})
    assert headers["X-Request-Id"] == seen == "client-id_1.2:3"
    for offered in ("", "has space", "x" * 200, "-leading-dash", 'quote"d', "new\\nline"):
        headers, seen = _call({"HTTP_X_REQUEST_ID": offered})
        assert headers["X-Request-Id"] == seen and re.fullmatch(r"[0-9a-f]{32}", seen or "")
