"""Connection turns: one per pooled connection, first come, first served, under one timer."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Generic, TypeVar

C = TypeVar("C")  # what is handed over with a turn: a connection


class Turns(Generic[C]):
    """One turn per pooled connection, handed out first come, first served.

    asyncpg's own queue lets a newcomer take a connection that was just handed to a waiter, who
    then queues again at the back (seen as p99 latency in the hundreds of ms under load); a
    request holds a turn from before it asks asyncpg for a connection until the connection is
    back. A connection coming back while others wait goes straight to the oldest waiter, turn
    and all, without the round trip through asyncpg's pool (a task and a timer per release).

    Every waiter waits at most the same `timeout` and they are served in order, so the oldest
    waiter always has the earliest deadline: one timer, set for the oldest waiter and moved on
    when it fires, bounds them all. (A timer per wait, as asyncio.timeout gives, was the single
    largest cost of a request under load.)
    """

    __slots__ = ("_free", "_loop", "_on_orphan", "_timeout", "_timer", "_waiters")

    def __init__(
        self, count: int, timeout: float, on_orphan: Callable[[C], None] | None = None
    ) -> None:
        self._free = count
        self._timeout = timeout
        # Takes a connection handed to a waiter that was cancelled before it could use it.
        self._on_orphan = on_orphan
        # (deadline, future) in arrival order; futures of waiters that left stay until reached.
        self._waiters: collections.deque[tuple[float, asyncio.Future[C | None]]] = (
            collections.deque()
        )
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def take_free(self) -> bool:
        """Take a turn if one is free and nobody waits for it; never blocks."""
        if self._free and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self) -> C | None:
        """Wait for a turn: returns the connection handed over with it, or None (then acquire
        one from the pool). TimeoutError after `timeout` seconds without one."""
        if self.take_free():
            return None
        loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[C | None] = loop.create_future()
        deadline = loop.time() + self._timeout
        self._waiters.append((deadline, future))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        try:
            return await future
        except asyncio.CancelledError:
            # Granted just as we were cancelled: pass the turn (and connection) on. exception()
            # also marks a timeout that raced the cancel as seen, so asyncio does not log it.
            if future.done() and not future.cancelled() and future.exception() is None:
                connection = future.result()
                if connection is None:
                    self.give_back()
                elif not self.hand_over(connection):
                    assert self._on_orphan is not None
                    self._on_orphan(connection)
            raise

    def hand_over(self, connection: C | None) -> bool:
        """Give `connection`, with its turn, to the oldest waiter; False if nobody waits."""
        waiters = self._waiters
        while waiters:
            _, future = waiters.popleft()
            if not future.done():
                future.set_result(connection)
                return True
        return False

    def give_back(self) -> None:
        """Return a turn: to the oldest waiter still waiting, else to the free ones."""
        if not self.hand_over(None):
            self._free += 1

    def _expire(self) -> None:
        # The timer was set for the deadline of whoever was oldest then; that waiter may have
        # been served since, so expire only those whose time is up and wait for the next one.
        self._timer = None
        assert self._loop is not None
        now = self._loop.time()
        waiters = self._waiters
        while waiters and waiters[0][0] <= now:
            _, future = waiters.popleft()
            if not future.done():
                future.set_exception(TimeoutError())
        if waiters:
            self._timer = self._loop.call_at(waiters[0][0], self._expire)
