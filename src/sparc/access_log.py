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

from sparc.logs import log_time, text_line
from sparc.request_ids import request_id_of
from sparc.route_templates import route_template
from sparc.settings import LogFormat
from sparc.text import escape_control_characters_in_json

ACCESS_LOGGER = "sparc.access"
_LEVEL = "INFO"


# A JSON string of `text`: quotes, backslashes and C0 controls escaped, the rest as it is (C).
_json_string: Callable[[str], str] = json.encoder.encode_basestring


def _json_optional(text: str | None) -> str:
    return "null" if text is None else _json_string(text)


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
        try:
            sys.stdout.write("".join(lines))
            sys.stdout.flush()
        except (OSError, ValueError):
            # stdout is gone (a closed pipe): a line that cannot be written must not fail
            # requests, and there is nowhere left to say so.
            pass

    def _json_line(self, scope: Scope, status: int, seconds: float) -> str:
        # The keys of sparc.logs.json_fields and the access keys, in the README's order, as
        # one format string: a quarter of what json.dumps of the same dict costs.
        method = scope["method"]
        path = scope["path"]
        line = (
            f'{{"time":"{log_time(time.time())}","level":"info","logger":"{ACCESS_LOGGER}",'
            f'"message":{_json_string(f"{method} {path} {status}")},'
            # From the scope, not the context: the line is made as the request ends.
            f'"request_id":{_json_optional(request_id_of(scope))},'
            f'"client":{_json_optional(_client(scope))},"method":{_json_string(method)},'
            f'"route":{_json_optional(route_template(scope))},"path":{_json_string(path)},'
            f'"status":{status},"duration_ms":{round(seconds * 1000, 3)},'
            f'"user_id":{_json_optional(_user_id(scope))}}}'
        )
        return escape_control_characters_in_json(line) + "\n"

    def _text_line(self, scope: Scope, status: int, seconds: float) -> str:
        route = route_template(scope)
        user_id = _user_id(scope)
        message = (
            f"{_client(scope) or '-'} {scope['method']} {scope['path']} {status} "
            f"{seconds * 1000:.1f}ms route={route or '-'} user_id={user_id or '-'}"
        )
        return text_line(time.time(), _LEVEL, ACCESS_LOGGER, message) + "\n"
