"""SPARC's log lines: one format, and nothing a client sent can break a record into two."""

from __future__ import annotations

import logging
from typing import Any

from sparc.text import escape_control_characters

LOG_FORMAT = "%(levelname)s:     %(name)s: %(message)s"
# A traceback keeps its line breaks, but no line of it starts a line of the log the way a
# record does: its text (an exception's message may quote a client) cannot pass for a record.
_DETAIL_INDENT = "    "


class EscapingFormatter(logging.Formatter):
    """A Formatter that writes each record as one line, control characters escaped (`\\n`,
    `\\x1b`, ...), followed by its traceback or stack, if any, indented."""

    def format(self, record: logging.LogRecord) -> str:
        # Formatter.format would append record.exc_text, which another handler's formatter
        # may have filled in unescaped: the details are formatted here, every time.
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = escape_control_characters(self.formatMessage(record))
        if record.exc_info:
            text += _indented(self.formatException(record.exc_info))
        if record.stack_info:
            text += _indented(self.formatStack(record.stack_info))
        return text


def _indented(detail: str) -> str:
    return "".join(
        f"\n{_DETAIL_INDENT}{escape_control_characters(line)}" for line in detail.split("\n")
    )


def logging_config(level: int) -> dict[str, Any]:
    """SPARC's logging, for `logging.config.dictConfig` and uvicorn's `log_config`: uvicorn applies
    it in every worker process too, and routes its own loggers through the same formatter."""
    handler = {"class": "logging.StreamHandler", "formatter": "sparc"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"sparc": {"()": EscapingFormatter, "fmt": LOG_FORMAT}},
        "handlers": {
            "stderr": {**handler, "stream": "ext://sys.stderr"},
            # uvicorn writes its access log to stdout; it stays there.
            "stdout": {**handler, "stream": "ext://sys.stdout"},
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            "uvicorn": {"level": level, "handlers": ["stderr"], "propagate": False},
            "uvicorn.access": {"level": level, "handlers": ["stdout"], "propagate": False},
        },
    }
