"""SPARC's log lines: one format (text or JSON), and nothing a client sent can break a record
into two."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from sparc.request_ids import current_request_id
from sparc.settings import LogFormat, LogLevel
from sparc.text import escape_control_characters, escape_control_characters_in_json

# A traceback keeps its line breaks, but no line of it starts a line of the log the way a
# record does: its text (an exception's message may quote a client) cannot pass for a record.
_DETAIL_INDENT = "    "
# The level and its colon, padded to this width, as uvicorn writes it ("INFO:     ").
_LEVEL_WIDTH = 10

# A line's time, in UTC, to the second; milliseconds and "Z" follow.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
# "000" to "999", for milliseconds: a lookup instead of formatting each time.
THREE_DIGITS = tuple(f"{n:03d}" for n in range(1000))

# Compact, and non-ASCII text kept readable; control characters are escaped afterwards.
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class _SecondsCache:
    """`2026-12-01T12:00:00.123Z` for a time.time() value: the date and time of day are worked
    out once per second, not once per line."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def format(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._prefix = time.strftime(TIME_FORMAT, time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{THREE_DIGITS[int((created - second) * 1000)]}Z"


log_time = _SecondsCache().format


def text_line(created: float, level: str, logger: str, message: str, request_id: str | None) -> str:
    """One record in the text format, control characters escaped; `request_id` at the end when
    it was logged while serving a request."""
    line = f"{log_time(created)} {level + ':':<{_LEVEL_WIDTH}}{logger}: {message}"
    if request_id is not None:
        line = f"{line} request_id={request_id}"
    return escape_control_characters(line)


def json_line(fields: Mapping[str, Any]) -> str:
    """One record as a JSON object on one line, control characters escaped (`\\u001b`)."""
    return escape_control_characters_in_json(_encode_json(fields))


def json_fields(created: float, level: str, logger: str, message: str) -> dict[str, Any]:
    """The keys every JSON line has: time, level, logger, message; and request_id when it was
    logged while serving a request."""
    fields: dict[str, Any] = {
        "time": log_time(created),
        "level": level.lower(),
        "logger": logger,
        "message": message,
    }
    request_id = current_request_id.get()
    if request_id is not None:
        fields["request_id"] = request_id
    return fields


class EscapingFormatter(logging.Formatter):
    """The text format: each record on one line, control characters escaped (`\\n`, `\\x1b`,
    ...), followed by its traceback or stack, if any, indented."""

    def format(self, record: logging.LogRecord) -> str:
        # Formatter.format would append record.exc_text, which another handler's formatter
        # may have filled in unescaped: the details are formatted here, every time.
        text = text_line(
            record.created,
            record.levelname,
            record.name,
            record.getMessage(),
            current_request_id.get(),
        )
        if record.exc_info:
            text += _indented(self.formatException(record.exc_info))
        if record.stack_info:
            text += _indented(self.formatStack(record.stack_info))
        return text


class JsonFormatter(logging.Formatter):
    """The JSON format: each record one JSON object on one line; a traceback or stack goes in
    `exception` or `stack`."""

    def format(self, record: logging.LogRecord) -> str:
        fields = json_fields(record.created, record.levelname, record.name, record.getMessage())
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        return json_line(fields)


def _indented(detail: str) -> str:
    return "".join(
        f"\n{_DETAIL_INDENT}{escape_control_characters(line)}" for line in detail.split("\n")
    )


def resolved_log_format(log_format: LogFormat | None) -> LogFormat:
    """SPARC_LOG_FORMAT, or when it is unset: text for a person at a terminal, JSON for
    whatever else reads stderr (journald, a container runtime, a log shipper)."""
    if log_format is not None:
        return log_format
    return "text" if sys.stderr.isatty() else "json"


def stream_handler(stream: TextIO) -> logging.StreamHandler[TextIO]:
    """A handler writing to `stream`; Python's warnings go through logging from then on, so
    that in JSON mode they too are JSON lines (dictConfig makes it in every worker process)."""
    logging.captureWarnings(True)
    return logging.StreamHandler(stream)


def logging_config(level: LogLevel, log_format: LogFormat) -> dict[str, Any]:
    """SPARC's logging, for `logging.config.dictConfig` and uvicorn's `log_config`: uvicorn applies
    it in every worker process too, and routes its own loggers through the same formatter."""
    formatter = JsonFormatter if log_format == "json" else EscapingFormatter
    handler = {"()": stream_handler, "formatter": "sparc"}
    name = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"sparc": {"()": formatter}},
        "handlers": {
            "stderr": {**handler, "stream": "ext://sys.stderr"},
            # uvicorn's access log, when it is on (not in `sparc serve`), writes to stdout.
            "stdout": {**handler, "stream": "ext://sys.stdout"},
        },
        "root": {"level": name, "handlers": ["stderr"]},
        "loggers": {
            "uvicorn": {"level": name, "handlers": ["stderr"], "propagate": False},
            "uvicorn.access": {"level": name, "handlers": ["stdout"], "propagate": False},
        },
    }
