"""SPARC's log lines: one record, one line, whatever a client sent; text or JSON; every worker
and uvicorn itself log alike."""

from __future__ import annotations

import json
import logging
import logging.config
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import pytest

from sparc.logs import EscapingFormatter, JsonFormatter, logging_config
from sparc.request_ids import current_request_id
from tests.processes import (
    LOG_RECORD_START,
    poll,
    sparc_env,
    start_serve,
    stop_with_output,
)

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def record(message: str, *args: object, exc_info: bool = False) -> logging.LogRecord:
    return logging.LogRecord(
        "sparc.test", logging.INFO, __file__, 1, message, args, sys.exc_info() if exc_info else None
    )


def formatted(message: str, *args: object, exc_info: bool = False) -> str:
    """The text line, without its leading time."""
    line = EscapingFormatter().format(record(message, *args, exc_info=exc_info))
    assert re.match(f"{TIME} ", line), line
    return line.partition(" ")[2]


def json_formatted(message: str, *args: object, exc_info: bool = False) -> str:
    return JsonFormatter().format(record(message, *args, exc_info=exc_info))


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
    text = EscapingFormatter().format(plain)
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
@pytest.mark.parametrize(
    ("log_format", "formatter"), [("text", EscapingFormatter), ("json", JsonFormatter)]
)
def test_the_logging_config_puts_sparc_and_uvicorn_through_one_formatter(
    log_format: Literal["text", "json"], formatter: type[logging.Formatter]
) -> None:
    logging.config.dictConfig(logging_config("info", log_format))
    for name in ("", "uvicorn", "uvicorn.access"):
        handlers = logging.getLogger(name).handlers
        assert handlers, name
        assert all(type(handler.formatter) is formatter for handler in handlers)
    assert logging.getLogger("uvicorn.error").propagate  # to "uvicorn"'s handler


@pytest.mark.usefixtures("restore_logging")
def test_the_logging_config_sets_the_level() -> None:
    logging.config.dictConfig(logging_config("warning", "text"))
    assert logging.getLogger().level == logging.WARNING
    assert logging.getLogger("uvicorn").level == logging.WARNING


def test_a_text_line_starts_with_the_time_in_utc() -> None:
    line = EscapingFormatter().format(record("hello"))
    assert re.fullmatch(f"{TIME} INFO:     sparc.test: hello", line), line


def test_a_json_line_has_the_stable_keys() -> None:
    fields = json.loads(json_formatted("hello %s", "world"))
    assert list(fields) == ["time", "level", "logger", "message"]
    assert re.fullmatch(TIME, fields["time"])
    assert (fields["level"], fields["logger"], fields["message"]) == (
        "info",
        "sparc.test",
        "hello world",
    )


@pytest.mark.parametrize(
    "sent",
    [
        "line\nforged",
        "\x1b[2J",
        "CSI \x9b2J",
        "NEL \x85",
        "sep\u2028",
        "bidi \u202e",
        "\ud800",
        "é 日本",
    ],
)
def test_a_json_line_is_one_line_of_ascii_controls_escaped_and_decodes_to_what_was_sent(
    sent: str,
) -> None:
    line = json_formatted("client sent %s", sent)
    assert "\n" not in line
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\ud800-\udfff]", line)
    assert json.loads(line)["message"] == f"client sent {sent}"


def test_a_json_line_carries_a_traceback_in_its_exception_key() -> None:
    try:
        raise ValueError("client said\nforged")
    except ValueError:
        line = json_formatted("request failed", exc_info=True)
    assert "\n" not in line
    fields = json.loads(line)
    assert fields["message"] == "request failed"
    assert fields["exception"].startswith("Traceback (most recent call last):")
    assert "ValueError: client said\nforged" in fields["exception"]


def test_a_line_logged_while_serving_a_request_names_its_id() -> None:
    token = current_request_id.set("req-42")
    try:
        text = formatted("inside")
        fields = json.loads(json_formatted("inside"))
    finally:
        current_request_id.reset(token)
    assert text == "INFO:     sparc.test: inside request_id=req-42"
    assert fields["request_id"] == "req-42"
    assert "request_id" not in json.loads(json_formatted("outside"))


def test_in_json_mode_every_line_sparc_serve_writes_is_json(
    tmp_path: Path, cli_database: str
) -> None:
    # Startup (the database check, migrations, uvicorn's own lines), requests, shutdown. JSON
    # is the default when stderr is no terminal, as here.
    env = sparc_env(DATABASE_URL=cli_database)
    del env["SPARC_LOG_FORMAT"]
    process, base = start_serve(env, cwd=tmp_path, capture_stdout=True)
    try:
        poll(f"{base}/readyz", process=process)
        assert httpx.get(f"{base}/no/such/page").status_code == 404
    finally:
        code, stdout, stderr = stop_with_output(process)
    assert code == 0, stderr
    lines = [*stdout.splitlines(), *stderr.splitlines()]
    records = [json.loads(line) for line in lines]  # fails on any line that is not JSON
    loggers = {record["logger"] for record in records}
    assert {"sparc", "sparc.database", "alembic.runtime.migration", "sparc.access"} <= loggers
    assert "uvicorn.error" in loggers
    messages = [record["message"] for record in records]
    assert any(message.startswith("Started server process") for message in messages)
    assert any(message.startswith("Finished server process") for message in messages)
    assert any(record.get("path") == "/no/such/page" for record in records)
