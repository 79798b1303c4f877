"""The access log: one line per request, in the log format, written in batches to stdout.

DatabaseMiddleware already knows each request's route, status and duration as it ends (it
reports them to the metrics); the request is noted there (its time, scope, status and
duration), with no logging record, no handler lock, no formatter and no system call in between,
and the lines are made from the notes as their batch is written. Lines are written in batches:
when BATCH_LINES are waiting (under load: one write for a dozen requests), else FLUSH_SECONDS
after the first of them, and at shutdown, after which each line goes out at once. A line so
waits at most a tenth of a second; a process killed outright (SIGKILL) loses at most that
tenth's lines.

A line names the time, the client's address (behind trusted proxies, as sparc.proxies put it in
the scope), the method, the route template and the path (without the query string, which may
carry a secret), the status, the duration, the request's id and, for an authenticated request,
the user's id. Nothing else of the request: no header, no token.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sys
import time
from collections.abc import Callable

from starlette.authentication import BaseUser
from starlette.types import Scope

from sparc.identity import AuthenticatedUser
from sparc.logs import THREE_DIGITS, TIME_FORMAT, text_line
from sparc.request_ids import REQUEST_ID_SCOPE_KEY
from sparc.route_templates import route_template
from sparc.settings import LogFormat

ACCESS_LOGGER = "sparc.access"
logger = logging.getLogger(__name__)  # what goes wrong with the access log, not its lines
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
# "0" to "999", for the whole milliseconds of a duration: a lookup instead of str() each time.
_NUMBERS_KEPT = 1000
_NUMBERS = tuple(str(n) for n in range(_NUMBERS_KEPT))

# The context a batch is written in: no request's (its id would be the current one). One for all
# access logs: a timer's callback enters it, and one event loop per thread never runs two at
# once (two loops in two threads sharing one app would need a context each).
OUTSIDE_REQUESTS = contextvars.Context()
# What a line needs of a request, noted as it ends: when it was answered, its scope (read when
# its batch is made: nothing in it changes once the request is answered), status and seconds.
# The scope, its headers among it, so lives on as long as its batch waits: FLUSH_SECONDS, as a
# rule.
_Note = tuple[float, Scope, int, float]

# A JSON string of client text, all ASCII: quotes, backslashes, controls and everything beyond
# `~` escaped (`\u001b`, `\u00e9`), so the line needs no escaping afterwards. C code.
_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _user_id(user: BaseUser | None) -> str | None:
    """The id of the user AuthenticationMiddleware found (the scope's "user"), if any."""
    if user is None or not user.is_authenticated:
        return None
    return str(user.identity)  # another app's identity need not be a str


def _chunks(text: str) -> list[str]:
    """`text`'s lines in runs of at most ATOMIC_WRITE bytes (a longer line alone). Every line
    ends in a newline and holds no other: both formats escape control characters."""
    chunks: list[str] = []
    chunk: list[str] = []
    size = 0
    for line in text.split("\n")[:-1]:
        line += "\n"
        length = len(line) if line.isascii() else len(line.encode())
        if chunk and size + length > ATOMIC_WRITE:
            chunks.append("".join(chunk))
            chunk, size = [], 0
        chunk.append(line)
        size += length
    chunks.append("".join(chunk))
    return chunks


class AccessLog:
    """Notes each request as it ends; makes and writes their lines in batches."""

    def __init__(self, log_format: LogFormat) -> None:
        # The text of a batch's lines, made from their notes, the way of the format.
        self._batch_text = self._json_batch if log_format == "json" else self._text_batch
        # The notes of the requests answered since the last batch was written.
        self._answered: list[_Note] = []
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

        The request is noted, no more: its line is made with the others of its batch and
        written with them (BATCH_LINES, FLUSH_SECONDS), which costs less than making and
        writing each as its request ends; after `close()`, at once. This runs on every request:
        each step in it is counted (a frame, a property, a system call).
        """
        answered = self._answered
        answered.append((time.time(), scope, status, seconds))
        if len(answered) >= BATCH_LINES or self._closed:
            self.flush()
        elif self._timer is None:
            # Not in the context of the request that happens to come first: the lines are
            # every request's, written outside all of them. (asyncio.get_running_loop() costs a
            # getpid system call: once a batch, not once a request.)
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(FLUSH_SECONDS, self.flush, context=OUTSIDE_REQUESTS)
            self._timer_loop = loop
        elif self._timer_loop is not None and not self._timer_loop.is_running():
            # Lines noted under an event loop that stopped or closed before its timer ran (an
            # app served by one loop after another, as tests and embedders do): they go out
            # now, this one too.
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
        try:
            text = self._batch_text(answered)
        except Exception:
            text = self._batch_text_line_by_line(answered)
        # Whole lines, at most ATOMIC_WRITE bytes a write: several workers writing to one pipe
        # never interleave inside a line. A batch mostly fits in one (isascii() is a flag
        # lookup: an ASCII text's length is its size in bytes).
        chunks = [text] if text.isascii() and len(text) <= ATOMIC_WRITE else _chunks(text)
        stdout = sys.stdout
        try:
            for chunk in chunks:
                stdout.write(chunk)
                stdout.flush()
        except (OSError, ValueError):
            # stdout is gone (a closed pipe): a line that cannot be written must not fail
            # requests, and there is nowhere left to say so.
            pass

    def _batch_text_line_by_line(self, notes: list[_Note]) -> str:
        # A line that cannot be made (a scope another app's layers filled oddly: a user whose
        # identity raises) must not take its batch's other lines with it, nor fail the request
        # that happened to fill the batch: it is reported, the others are written.
        lines = []
        for note in notes:
            try:
                lines.append(self._batch_text([note]))
            except Exception:
                # Named: this may run while another request is served, whose id the line has.
                request_id = note[1].get(REQUEST_ID_SCOPE_KEY)
                logger.exception("the access line of request %s could not be made", request_id)
        return "".join(lines)

    def _json_batch(self, notes: list[_Note]) -> str:
        # The keys of sparc.logs.json_fields, then the access keys, in the README's order, the
        # parts of every line of the batch joined at once (a fifth of what json.dumps of the
        # same dicts costs). What depends on the request's method, path, status and route alone
        # was escaped once and kept (the same few routes come again and again); the time's date
        # and second are made once a second; the request id (sane, see sparc.request_ids)
        # needs no escaping.
        fixed_parts = self._fixed
        parts: list[str] = []
        for now, scope, status, seconds in notes:
            # The router picks the same route for the same method and path every time; a
            # request answered before routing (a 401) has its route looked up apart.
            key = (scope["method"], scope["path"], status, "route" in scope)
            opening, middle = fixed_parts.get(key) or self._fix(scope, key)
            second = int(now)
            if second != self._second:
                self._second = second
                self._opening = f'{{"time":"{time.strftime(TIME_FORMAT, time.gmtime(second))}.'
            request_id = scope.get(REQUEST_ID_SCOPE_KEY)
            client = scope.get("client")
            user = scope.get("user")
            if type(user) is AuthenticatedUser:
                # SPARC's own user, straight to its id (a UUID: nothing to escape), two
                # property calls less; another app's user class, through BaseUser's.
                user_part = f'"{user.id!s}"}}\n'
            else:
                user_id = _user_id(user)
                user_part = "null}\n" if user_id is None else f"{_json_string(user_id)}}}\n"
            # Integer arithmetic and lookups: an operator costs less than a call.
            micros = int(seconds * 1_000_000)
            whole = micros // 1000
            parts += (
                self._opening,
                THREE_DIGITS[int((now - second) * 1000)],  # as sparc.logs.log_time makes it
                opening,
                "null" if request_id is None else f'"{request_id}"',
                ',"client":',
                "null" if not client else _json_string(client[0]),
                middle,
                _NUMBERS[whole] if 0 <= whole < _NUMBERS_KEPT else str(whole),
                ".",
                THREE_DIGITS[micros - whole * 1000],
                ',"user_id":',
                user_part,
            )
        return "".join(parts)

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

    def _text_batch(self, notes: list[_Note]) -> str:
        lines = []
        for now, scope, status, seconds in notes:
            client = scope.get("client")
            message = (
                f"{client[0] if client else '-'} {scope['method']} {scope['path']} {status} "
                f"{seconds * 1000:.1f}ms route={route_template(scope) or '-'} "
                f"user_id={_user_id(scope.get('user')) or '-'}"
            )
            request_id = scope.get(REQUEST_ID_SCOPE_KEY)
            lines.append(text_line(now, _LEVEL, ACCESS_LOGGER, message, request_id) + "\n")
        return "".join(lines)
