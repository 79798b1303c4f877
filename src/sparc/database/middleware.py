"""DatabaseMiddleware: a unit of work per HTTP request, and the one place where database errors
become HTTP answers."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sparc.database.client import DatabaseClient
from sparc.database.context import bind_db_client, current_client, current_unit
from sparc.database.errors import (
    CommandTimeout,
    CommitFailed,
    DatabaseUnavailable,
    PoolQueueFull,
    PoolTimeout,
    StatementTimeout,
    TransactionConflict,
    WritesRefused,
)
from sparc.database.replay import RequestMessages, may_replay
from sparc.database.unit import UnitOfWork
from sparc.problems import problem_response

logger = logging.getLogger("sparc.database")

# What a client is told, by the kind of DatabaseUnavailable: the seconds to wait before trying
# again (Retry-After; a busy pool or a lost race clears at once, an outage takes longer) and the
# problem's detail. The detail is the same for every error of a kind: the exception's own message
# names the server (host, port, user) and goes only to the log.
_POOL_BUSY = (1, "Every database connection is busy; nothing was done, retry later.")
_ANSWERS: dict[type[DatabaseUnavailable], tuple[int, str]] = {
    PoolTimeout: _POOL_BUSY,
    PoolQueueFull: _POOL_BUSY,
    StatementTimeout: (1, "A database statement ran too long and was cancelled; nothing was kept."),
    CommandTimeout: (5, "The database did not answer in time; nothing was kept, retry later."),
    TransactionConflict: (
        1,
        "The request's transaction kept losing races with other transactions; nothing was "
        "kept, retry later.",
    ),
    # A switchover is over in seconds.
    WritesRefused: (
        2,
        "The database refused to write: it is read-only for now; nothing was kept, retry later.",
    ),
    DatabaseUnavailable: (5, "The database is unavailable; nothing was kept, retry later."),
}


def _answer(exc: DatabaseUnavailable) -> tuple[int, str]:
    """Retry-After seconds and detail of the 503 answering `exc`, found along its class's MRO."""
    for cls in type(exc).__mro__:
        if cls in _ANSWERS:
            return _ANSWERS[cls]
    return _ANSWERS[DatabaseUnavailable]


class DatabaseMiddleware:
    """Binds the app's DatabaseClient and a fresh unit of work to each HTTP request.

    The request's transaction ends just before the response status line goes out: it commits
    when the status is below 400 (or below 500 after keep_writes()) and the client is still
    there; otherwise it rolls back. If the commit fails, the client gets a 5xx problem instead of
    the endpoint's answer. A request whose transaction lost a race with another
    (TransactionConflict) is run again, up to DB_RETRY_ATTEMPTS times, when that is safe: nothing
    was sent yet, its body was read in full or not at all, and its method is idempotent or its
    endpoint is marked with `retry_on_conflict`.
    """

    def __init__(
        self,
        app: ASGIApp,
        client: DatabaseClient,
        on_answered: Callable[[Scope, int, float], None] | None = None,
        on_arrival: Callable[[Scope], Sequence[tuple[bytes, bytes]]] | None = None,
    ) -> None:
        self.app = app
        self.client = client
        # Told of every HTTP request once it is over: its final scope (with the matched route),
        # the status that went out (500 if none did) and the seconds it took. It spares the
        # metrics and the access log a middleware layer of their own.
        self.on_answered = on_answered
        # Told of every HTTP request as it arrives, before anything else runs (it may add to the
        # scope and set context variables: a request id); returns the headers to add to its
        # answer, which this middleware's send wrapper spares a layer of their own too.
        self.on_arrival = on_arrival

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            with bind_db_client(self.client):
                await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        added = self.on_arrival(scope) if self.on_arrival else ()
        client_token = current_client.set(self.client)
        retries_left = self.client.settings.retry_attempts
        request = RequestMessages(receive, replayable=retries_left > 0)
        # Each run gets the scope as it arrived: the app adds to it (route, user, state).
        original = {**scope, "state": dict(scope.get("state", {}))} if retries_left else scope
        try:
            while True:
                try:
                    await self._run_once(scope, request, send, added, may_retry=retries_left > 0)
                    return
                except _Replay:
                    retries_left -= 1
                    self.client.events.transaction_retried()
                    request.rewind()
                    scope = {**original, "state": dict(original.get("state", {}))}
                    # A moment's jitter, so the transactions that collided do not collide again.
                    await asyncio.sleep(random.uniform(0, 0.005))
        finally:
            current_client.reset(client_token)
            if self.on_answered is not None:
                # No status went out: the exception reaches ServerErrorMiddleware, which
                # answers 500.
                status = request.response_status or 500
                self.on_answered(scope, status, time.perf_counter() - started)

    async def _run_once(
        self,
        scope: Scope,
        request: RequestMessages,
        send: Send,
        added: Sequence[tuple[bytes, bytes]],
        *,
        may_retry: bool,
    ) -> None:
        unit = UnitOfWork(self.client.pool)
        unit_token = current_unit.set(unit)
        response_started = False
        replaced = False

        async def send_ending_transaction(message: Message) -> None:
            nonlocal response_started, replaced
            if replaced:
                return  # our error answer replaced the endpoint's; drop the rest of it
            if message["type"] == "http.response.start":
                status = message["status"]
                if status >= 400 and unit.conflicted and may_retry and may_replay(scope, request):
                    # The endpoint caught a lost race and answered an error: run it again.
                    await unit.end(commit=False)
                    raise _Replay
                commit = status < 400 or (unit.keep_writes and status < 500)
                if commit and unit.in_transaction and await request.client_gone():
                    commit = False
                try:
                    await unit.end(commit=commit)
                except (CommitFailed, DatabaseUnavailable) as exc:
                    conflict = isinstance(exc, TransactionConflict)
                    if conflict and may_retry and may_replay(scope, request):
                        # Nothing went out yet: stop this run's response and start over.
                        raise _Replay from None
                    replaced = True
                    response_started = True
                    logger.error("%s; answering 5xx instead of %d", exc, status)
                    await _answer_error(exc, scope, request, send, added)
                    # Stop the endpoint's response there: its background tasks must not run
                    # for a request whose writes were lost.
                    raise _ResponseReplaced from None
                response_started = True
                request.response_status = status
                if added:  # a new list: the message's may be the Response object's own
                    message["headers"] = [*message.get("headers", ()), *added]
            await send(message)

        try:
            await self.app(scope, request.receive, send_ending_transaction)
        except _ResponseReplaced:
            pass  # already answered with the 5xx
        except _Replay:
            raise  # this run's unit has ended; __call__ starts the next run
        except DatabaseUnavailable as exc:
            await unit.end(commit=False)
            if response_started:
                raise
            conflict = isinstance(exc, TransactionConflict)
            if conflict and may_retry and may_replay(scope, request):
                raise _Replay from None
            # Info, not warning: under overload this fires for every refused request.
            logger.info("answering 503: %s", exc)
            await _answer_error(exc, scope, request, send, added)
        except BaseException as exc:
            await unit.end(commit=False)
            if not unit.conflicted or response_started or not isinstance(exc, Exception):
                raise
            # A lost race that reached us wrapped (e.g. in a task group's ExceptionGroup).
            if may_retry and may_replay(scope, request):
                raise _Replay from None
            logger.info("answering 503: a lost race ended in %r", exc)
            lost = TransactionConflict(
                "the request's transaction lost a race with another transaction",
                sqlstate=None,
                constraint=None,
            )
            await _answer_error(lost, scope, request, send, added)
        else:
            await unit.end(commit=False)  # no-op unless the app sent no response at all
        finally:
            current_unit.reset(unit_token)


class _Replay(Exception):
    """Internal: the request's transaction lost a race; run the request again."""


class _ResponseReplaced(Exception):
    """Internal: the commit failed and a 5xx went out instead of the endpoint's response."""


async def _answer_error(
    exc: Exception,
    scope: Scope,
    request: RequestMessages,
    send: Send,
    added: Sequence[tuple[bytes, bytes]],
) -> None:
    """Answer with the problem `exc` calls for, in place of the endpoint's response."""
    if isinstance(exc, DatabaseUnavailable):
        seconds, detail = _answer(exc)
        response = problem_response(
            503,
            detail,
            title=(
                "Transaction conflict"
                if isinstance(exc, TransactionConflict)
                else "Database unavailable"
            ),
            headers={"Retry-After": str(seconds)},
        )
    else:
        response = problem_response(
            500, "The request's changes could not be saved; nothing was kept."
        )
    response.raw_headers.extend(added)
    request.response_status = response.status_code
    await response(scope, request.receive, send)
