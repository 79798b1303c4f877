"""The access log: one line per request, in the log format, written in batches to stdout.

DatabaseMiddleware already knows each request's route, status and duration as it ends (it
reports them to the metrics); the line is made there, in one step, with no logging record, no
handler lock and no formatter in between. Lines made in one turn of the event loop are written
together at the end of it: under load one write for many requests, when quiet one per request,
and none ever waits for a later request or a timer.

A line names the time, the client's address (behind trusted proxies, as sparc.proxies put it in
the scope), the method, the route template and the path (without the query string, which may
carry a secret), the status, the duration, the request's id and, for an authenticated request,
the user's id. Nothing else of the request: no header, no token.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable

from starlette.types import Scope

from sparc.logs import THREE_DIGITS, log_time, text_line
from sparc.request_ids import request_id_of
from sparc.route_templates import route_template
from sparc.settings import LogFormat

ACCESS_LOGGER = "sparc.access"
_LEVEL = "INFO"
# POSIX's PIPE_BUF minimum, Linux's value: a write to a pipe of at most this many bytes is never
# interleaved with another process's writes.
ATOMIC_WRITE = 4096

# A JSON string of client text, all ASCII: quotes, backslashes, controls and everything beyond
# `~` escaped (`\u001b`, `\u00e9`), so the line needs no escaping afterwards. C code.
_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _user_id(scope: Scope) -> str | None:
    user = scope.get("user")  # what AuthenticationMiddleware found, if it ran
    if user is None or not user.is_authenticated:
        return None
    user_id: str = user.identity
    return user_id


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


class AccessLog:
    """Makes each request's line and writes the lines of an event-loop turn together."""

    def __init__(self, log_format: LogFormat) -> None:
        self._line: Callable[[Scope, int, float], str] = (
            self._json_line if log_format == "json" else self._text_line
        )
        self._pending: list[str] = []

    def request_answered(self, scope: Scope, status: int, seconds: float) -> None:
        """DatabaseMiddleware's report of a request that ended: its line, written soon."""
        self._pending.append(self._line(scope, status, seconds))
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write the lines made so far."""
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        stdout = sys.stdout
        try:
            # Whole lines, at most ATOMIC_WRITE bytes a write: several workers writing to one
            # pipe never interleave inside a line.
            chunk: list[str] = []
            size = 0
            for line in lines:
                length = len(line) if line.isascii() else len(line.encode())
                if chunk and size + length > ATOMIC_WRITE:
                    stdout.write("".join(chunk))
                    stdout.flush()
                    chunk, size = [], 0
                chunk.append(line)
                size += length
            stdout.write("".join(chunk))
            stdout.flush()
        except (OSError, ValueError):
            # stdout is gone (a closed pipe): a line that cannot be written must not fail
            # requests, and there is nowhere left to say so.
            pass

    def _json_line(self, scope: Scope, status: int, seconds: float) -> str:
        # The keys of sparc.logs.json_fields, then the access keys, in the README's order, as
        # one format string: a fifth of what json.dumps of the same dict costs. The request id
        # and the user id (a UUID) need no escaping.
        method = _json_string(scope["method"])
        path = _json_string(scope["path"])
        client = _client(scope)
        route = route_template(scope)
        request_id = request_id_of(scope)
        user_id = _user_id(scope)
        quoted_request_id = "null" if request_id is None else f'"{request_id}"'
        quoted_user_id = "null" if user_id is None else f'"{user_id}"'
        micros = int(seconds * 1_000_000)
        return (
            f'{{"time":"{log_time(time.time())}","level":"info","logger":"{ACCESS_LOGGER}",'
            f'"message":"{method[1:-1]} {path[1:-1]} {status}",'
            f'"request_id":{quoted_request_id},'
            f'"client":{"null" if client is None else _json_string(client)},"method":{method},'
            f'"route":{"null" if route is None else _json_string(route)},"path":{path},'
            f'"status":{status},"duration_ms":{micros // 1000}.{THREE_DIGITS[micros % 1000]},'
            f'"user_id":{quoted_user_id}}}\n'
        )

    def _text_line(self, scope: Scope, status: int, seconds: float) -> str:
        route = route_template(scope)
        user_id = _user_id(scope)
        message = (
            f"{_client(scope) or '-'} {scope['method']} {scope['path']} {status} "
            f"{seconds * 1000:.1f}ms route={route or '-'} user_id={user_id or '-'}"
        )
        return text_line(time.time(), _LEVEL, ACCESS_LOGGER, message) + "\n"
