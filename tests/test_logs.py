"""SPARC's log lines: one record, one line, whatever a client sent; every worker logs alike."""

from __future__ import annotations

import logging
import logging.config
import sys
from collections.abc import Iterator

import pytest

from sparc.logs import LOG_FORMAT, EscapingFormatter, logging_config
from tests.processes import LOG_RECORD_START


def record(message: str, *args: object, exc_info: bool = False) -> logging.LogRecord:
    return logging.LogRecord(
        "sparc.test", logging.INFO, __file__, 1, message, args, sys.exc_info() if exc_info else None
    )


def formatted(message: str, *args: object, exc_info: bool = False) -> str:
    return EscapingFormatter(LOG_FORMAT).format(record(message, *args, exc_info=exc_info))


@pytest.mark.parametrize(
    ("sent", "logged"),
    [
        ("line\nINFO:     sparc: forged", "line\\nINFO:     sparc: forged"),
        ("carriage\rreturn", "carriage\\rreturn"),
        ("\x1b[2J\x1b[31mred", "\\x1b[2J\\x1b[31mred"),
        ("one-byte CSI \x9b2J", "one-byte CSI \\x9b2J"),
        ("next line \x85 NEL", "next line \\x85 NEL"),
        ("separator\u2028here", "separator\\u2028here"),
        ("bidi \u202eoverride", "bidi \\u202eoverride"),
        ("tab\there, bell\x07, NUL\x00, DEL\x7f", "tab\\there, bell\\x07, NUL\\x00, DEL\\x7f"),
        ("surrogate \ud800", "surrogate \\ud800"),
        ("plain text, é, 日本, back\\slash", "plain text, é, 日本, back\\slash"),
    ],
)
def test_control_characters_in_a_message_are_escaped(sent: str, logged: str) -> None:
    assert formatted("client sent %s", sent) == f"INFO:     sparc.test: client sent {logged}"


def test_a_message_itself_is_escaped_not_only_its_arguments() -> None:
    assert formatted("a\nb") == "INFO:     sparc.test: a\\nb"


def test_a_traceback_is_indented_so_no_line_of_it_passes_for_a_record() -> None:
    try:
        raise ValueError("client said\nERROR:    sparc: forged\x1b[0m")
    except ValueError:
        text = formatted("request failed", exc_info=True)
    first, *details = text.split("\n")
    assert first == "INFO:     sparc.test: request failed"
    assert details[0] == "    Traceback (most recent call last):"
    assert all(line.startswith("    ") for line in details)
    assert "    ERROR:    sparc: forged\\x1b[0m" in details


def test_a_traceback_another_formatter_cached_unescaped_is_formatted_again() -> None:
    try:
        raise ValueError("forged\nINFO:     sparc: x")
    except ValueError:
        plain = record("failed", exc_info=True)
    logging.Formatter().format(plain)  # caches record.exc_text, unescaped
    text = EscapingFormatter(LOG_FORMAT).format(plain)
    assert all(LOG_RECORD_START.match(line) or line.startswith("    ") for line in text.split("\n"))


@pytest.fixture
def restore_logging() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.access")]
    saved = [(logger, logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, handlers, level, propagate in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.mark.usefixtures("restore_logging")
def test_the_logging_config_puts_sparc_and_uvicorn_through_the_escaping_formatter() -> None:
    logging.config.dictConfig(logging_config(logging.INFO))
    for name in ("", "uvicorn", "uvicorn.access"):
        handlers = logging.getLogger(name).handlers
        assert handlers, name
        assert all(isinstance(handler.formatter, EscapingFormatter) for handler in handlers)
    assert logging.getLogger("uvicorn.error").propagate  # to "uvicorn"'s handler
