"""Client-side deadlines of the statements in flight: one timer, and a connection whose
statement outlives its deadline is cut.

A frozen or partitioned server cannot cancel anything (and a cancel request to it hangs as
well), so the only bound that holds is the client's own: terminate the connection. There is at
most one statement in flight per pooled connection, so the set to watch is small; one timer,
set for the earliest deadline and moved on when it fires, watches them all (a timer per
statement would cost more than the rest of a request's bookkeeping).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

logger = logging.getLogger("sparc.database")

C = TypeVar("C")  # a connection


class Deadlines(Generic[C]):
    """Statements in flight by connection, each with `timeout` seconds to be answered."""

    __slots__ = ("_cut", "_loop", "_running", "_timeout", "_timer")

    def __init__(self, timeout: float, cut: Callable[[C], None]) -> None:
        self._timeout = timeout
        self._cut = cut  # ends a connection at once (terminate, never a cancel request)
        self._running: dict[C, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def timeout(self) -> float:
        return self._timeout

    def start(self, connection: C) -> None:
        """A statement goes out on `connection`."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        self._running[connection] = deadline
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)

    def finish(self, connection: C) -> bool:
        """The statement on `connection` is over; False if its deadline passed and the
        connection was cut."""
        return self._running.pop(connection, None) is not None

    def _expire(self) -> None:
        # The timer was set for the deadline of whichever statement was earliest then; it may
        # have finished since, so cut only what is overdue and wait for the next deadline.
        self._timer = None
        assert self._loop is not None
        now = self._loop.time()
        overdue = [connection for connection, due in self._running.items() if due <= now]
        try:
            for connection in overdue:
                del self._running[connection]
                logger.warning(
                    "PostgreSQL did not answer a statement within %g s (DB_COMMAND_TIMEOUT); "
                    "cutting its connection",
                    self._timeout,
                )
                try:
                    self._cut(connection)
                except Exception:
                    # One connection that cannot be cut must not leave the others unwatched.
                    logger.exception("cutting an overdue connection failed")
        finally:
            if self._running:
                self._timer = self._loop.call_at(min(self._running.values()), self._expire)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
