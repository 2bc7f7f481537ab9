"""One log format: every record a logfmt line with ts, level, logger, pid and event."""

from __future__ import annotations

import logging
import re
import sys

from service.logs import LogfmtFormatter, event_fields, quote

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
