"""The access log: one line per request, in the log format, written in batches to stdout.

DatabaseMiddleware already knows each request's route, status and duration as it ends (it
reports them to the metrics); what the line needs is noted there, with no logging record, no
handler lock and no formatter in between (a text line is made there whole; JSON lines are made
from their notes as their batch is written). Lines are written in batches: when BATCH_LINES are
waiting (under load: one write for a dozen requests), else FLUSH_SECONDS after the first of
them, and at shutdown, after which each line goes out at once. A line so waits at most a tenth
of a second; a process killed outright (SIGKILL) loses at most that tenth's lines.

A line names the time, the client's address (behind trusted proxies, as sparc.proxies put it in
the scope), the method, the route template and the path (without the query string, which may
carry a secret), the status, the duration, the request's id and, for an authenticated request,
the user's id. Nothing else of the request: no header, no token.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from starlette.types import Scope

from sparc.logs import THREE_DIGITS, TIME_FORMAT, text_line
from sparc.request_ids import REQUEST_ID_SCOPE_KEY
from sparc.route_templates import route_template
from sparc.settings import LogFormat

ACCESS_LOGGER = "sparc.access"
_LEVEL = "INFO"
# POSIX's PIPE_BUF minimum, Linux's value: a write to a pipe of at most this many bytes is never
# interleaved with another process's writes.
ATOMIC_WRITE = 4096
# Lines are written when this many are waiting (about what one ATOMIC_WRITE holds), or this
# many seconds after the first of them, whichever comes first.
BATCH_LINES = 12
FLUSH_SECONDS = 0.1
# The escaped parts of lines kept for this many methods, paths, statuses and routes at most, and
# only for paths of at most this many characters.
_FIXED_MAX = 1024
_CACHED_PATH_MAX = 256

# The context a batch is written in: no request's (its id would be the current one). One for all
# access logs: a timer's callback enters it, and one event loop per thread never runs two at
# once (two loops in two threads sharing one app would need a context each).
OUTSIDE_REQUESTS = contextvars.Context()
# What a JSON line needs of a request: when it was answered, the escaped parts its method, path,
# status and route make, its id, the client's address, the user's id and the seconds it took.
_JsonNote = tuple[float, tuple[str, str], str | None, str | None, str | None, float]

# A JSON string of client text, all ASCII: quotes, backslashes, controls and everything beyond
# `~` escaped (`\u001b`, `\u00e9`), so the line needs no escaping afterwards. C code.
_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _user_id(scope: Scope) -> str | None:
    user = scope.get("user")  # what AuthenticationMiddleware found, if it ran
    if user is None or not user.is_authenticated:
        return None
    user_id: str = user.identity
    return user_id


def _chunks(lines: list[str]) -> list[str]:
    """`lines` joined in runs of at most ATOMIC_WRITE bytes (a longer line alone)."""
    chunks: list[str] = []
    chunk: list[str] = []
    size = 0
    for line in lines:
        length = len(line) if line.isascii() else len(line.encode())
        if chunk and size + length > ATOMIC_WRITE:
            chunks.append("".join(chunk))
            chunk, size = [], 0
        chunk.append(line)
        size += length
    chunks.append("".join(chunk))
    return chunks


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


class AccessLog:
    """Notes each request as it ends; makes and writes their lines in batches."""

    def __init__(self, log_format: LogFormat) -> None:
        # Each format notes what its line needs as a request ends, and makes the lines of a
        # batch from those notes.
        self._noted: Callable[[Scope, int, float], Any]
        self._lines: Callable[[list[Any]], list[str]]
        if log_format == "json":
            self._noted, self._lines = self._json_noted, self._json_lines
        else:
            self._noted, self._lines = self._text_line, list
        # The notes of the requests answered since the last batch was written.
        self._answered: list[Any] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # A JSON line's escaped parts that depend on its method, path, status and route alone.
        self._fixed: dict[tuple[str, str, int, bool], tuple[str, str]] = {}
        # The opening of a JSON line up to the time's milliseconds, made once a second.
        self._second = -1
        self._opening = ""

    def request_answered(self, scope: Scope, status: int, seconds: float) -> None:
        """DatabaseMiddleware's report of a request that ended: its line, written soon.

        What the line needs is taken from the scope now, while it is at hand; the lines are
        written in batches (BATCH_LINES, FLUSH_SECONDS), which costs less than writing each as
        its request ends; after `close()`, at once.
        """
        answered = self._answered
        answered.append(self._noted(scope, status, seconds))
        if len(answered) >= BATCH_LINES or self._closed:
            self.flush()
            return
        if self._timer is None:
            # Not in the context of the request that happens to come first: the lines are
            # every request's, written outside all of them. (asyncio.get_running_loop() costs a
            # getpid system call: once a batch, not once a request.)
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(FLUSH_SECONDS, self.flush, context=OUTSIDE_REQUESTS)
            self._timer_loop = loop
        elif self._timer_loop is not None and self._timer_loop.is_closed():
            # Lines noted under an event loop that closed before its timer ran (an app served
            # by one loop after another, as tests and embedders do): they go out now, this one
            # too.
            self.flush()

    def open(self) -> None:
        """Write in batches (again): the app's lifespan has begun."""
        self._closed = False

    def close(self) -> None:
        """Write what waits, and from now on each line at once: the app is shutting down, and
        a request still ending (cancelled at the end of the grace period) has no later batch to
        wait for."""
        self._closed = True
        self.flush()

    def flush(self) -> None:
        """Write the lines of the requests answered so far."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._answered:
            return
        answered, self._answered = self._answered, []
        chunks = _chunks(self._lines(answered))
        stdout = sys.stdout
        try:
            # Whole lines, at most ATOMIC_WRITE bytes a write: several workers writing to one
            # pipe never interleave inside a line. A batch of lines mostly fits in one.
            for chunk in chunks:
                stdout.write(chunk)
                stdout.flush()
        except (OSError, ValueError):
            # stdout is gone (a closed pipe): a line that cannot be written must not fail
            # requests, and there is nowhere left to say so.
            pass

    def _json_noted(self, scope: Scope, status: int, seconds: float) -> _JsonNote:
        # The router picks the same route for the same method and path every time; a request
        # answered before routing (a 401) has its route looked up apart.
        key = (scope["method"], scope["path"], status, "route" in scope)
        return (
            time.time(),
            self._fixed.get(key) or self._fix(scope, key),
            scope.get(REQUEST_ID_SCOPE_KEY),
            _client(scope),
            _user_id(scope),
            seconds,
        )

    def _json_lines(self, notes: list[_JsonNote]) -> list[str]:
        # The keys of sparc.logs.json_fields, then the access keys, in the README's order, as
        # one format string: a fifth of what json.dumps of the same dict costs. What depends on
        # the request's method, path, status and route alone was escaped once and kept (the
        # same few routes come again and again); the time's date and second are made once a
        # second; the request id and the user id (a UUID) need no escaping.
        lines = []
        for now, (opening, middle), request_id, client, user_id, seconds in notes:
            second = int(now)
            if second != self._second:
                self._second = second
                self._opening = f'{{"time":"{time.strftime(TIME_FORMAT, time.gmtime(second))}.'
            quoted_request_id = "null" if request_id is None else f'"{request_id}"'
            quoted_client = "null" if client is None else _json_string(client)
            quoted_user_id = "null" if user_id is None else f'"{user_id}"'
            micros = int(seconds * 1_000_000)
            lines.append(
                f"{self._opening}{THREE_DIGITS[int((now - second) * 1000)]}{opening}"
                f'{quoted_request_id},"client":{quoted_client}{middle}'
                f'{micros // 1000}.{THREE_DIGITS[micros % 1000]},"user_id":{quoted_user_id}}}\n'
            )
        return lines

    def _fix(self, scope: Scope, key: tuple[str, str, int, bool]) -> tuple[str, str]:
        """The escaped parts of a JSON line that depend on its method, path, status and route:
        from the time to the request id's value, and from the client's to the duration's."""
        method, path, status, _ = key
        template = route_template(scope)
        method_json, path_json = _json_string(method), _json_string(path)
        fixed = (
            f'Z","level":"info","logger":"{ACCESS_LOGGER}",'
            f'"message":"{method_json[1:-1]} {path_json[1:-1]} {status}","request_id":',
            f',"method":{method_json},'
            f'"route":{"null" if template is None else _json_string(template)},'
            f'"path":{path_json},"status":{status},"duration_ms":',
        )
        # Paths a client made up must not grow it without end, nor long ones pin memory (the
        # server takes a request line of megabytes): at most _FIXED_MAX short ones are kept.
        if len(path) <= _CACHED_PATH_MAX:
            if len(self._fixed) >= _FIXED_MAX:
                self._fixed.clear()
            self._fixed[key] = fixed
        return fixed

    def _text_line(self, scope: Scope, status: int, seconds: float) -> str:
        route = route_template(scope)
        user_id = _user_id(scope)
        message = (
            f"{_client(scope) or '-'} {scope['method']} {scope['path']} {status} "
            f"{seconds * 1000:.1f}ms route={route or '-'} user_id={user_id or '-'}"
        )
        request_id = scope.get(REQUEST_ID_SCOPE_KEY)
        return text_line(time.time(), _LEVEL, ACCESS_LOGGER, message, request_id) + "\n"
