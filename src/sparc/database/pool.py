"""The process's one bounded pool: acquire, release and hand-over, reconnect backoff, session
settings, clean-ups that outlive their caller, and the pool's figures."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

from sparc.database import _asyncpg
from sparc.database._asyncpg import cancel_pending, due_for_recycling, is_closed
from sparc.database.deadlines import Deadlines
from sparc.database.driver import Connection, Pool
from sparc.database.errors import DatabaseUnavailable, PoolQueueFull, PoolTimeout
from sparc.database.events import PoolEvents
from sparc.database.sql import begin_statement, timeout_settings
from sparc.database.turns import Turns
from sparc.settings import Settings, database_hosts, mask_password

logger = logging.getLogger("sparc.database")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PoolStats:
    size: int  # open connections
    idle: int
    in_use: int
    max: int
    min: int
    waiting: int  # requests waiting for a connection right now


class ReconnectBackoff:
    """After a failed connection attempt, wait before the next: capped, doubling, jittered."""

    FIRST = 0.1
    # Short enough that requests succeed within seconds of the server's return.
    CAP = 2.0

    def __init__(self) -> None:
        self._failures = 0
        self._next_attempt = 0.0

    def wait_left(self) -> float:
        if not self._failures:
            return 0.0
        return max(0.0, self._next_attempt - time.monotonic())

    def failed(self) -> None:
        delay = min(self.CAP, self.FIRST * 2**self._failures)
        self._failures += 1
        # Full jitter: several workers (and instances) must not retry in step.
        self._next_attempt = time.monotonic() + random.uniform(delay / 2, delay)

    def succeeded(self) -> None:
        self._failures = 0


class ConnectionPool:
    """DB_POOL_MAX_SIZE connections of the driver's pool, lent out in turns.

    Also decides how its connections' sessions are configured: the timeouts go in the startup
    settings, or behind PgBouncer (which refuses them there) with every BEGIN.
    """

    def __init__(self, settings: Settings, events: PoolEvents, application_name: str) -> None:
        self.settings = settings
        self.events = events
        self.application_name = application_name
        self.turns: Turns[Connection] = Turns(
            settings.pool_max_size, settings.pool_timeout, self._release_orphan
        )
        self.deadlines: Deadlines[Connection] = Deadlines(settings.command_deadline, _cut)
        self._database: _asyncpg.DriverDatabase | None = None
        self._pool: Pool | None = None
        self._waiting = 0
        self._backoff = ReconnectBackoff()
        self._cleanups: set[asyncio.Future[Any]] = set()  # work that outlives its caller
        timeouts = timeout_settings(
            statement_timeout=settings.statement_timeout,
            idle_in_transaction_timeout=settings.idle_in_transaction_timeout,
        )
        # PgBouncer passes application_name on to the server but refuses other startup
        # settings; behind it the timeouts are set per transaction instead, and the server's
        # side of dead-peer detection is PgBouncer's own (its tcp_keepalive settings).
        self._startup_settings = {"application_name": application_name}
        self._transaction_settings: dict[str, str] = {}
        if settings.pgbouncer:
            self._transaction_settings = timeouts
        else:
            self._startup_settings.update(timeouts)
            self._startup_settings.update(_asyncpg.dead_peer_settings(settings.dead_peer_timeout))
        # The BEGIN of nearly every transaction, made once.
        self.plain_begin = begin_statement(None, self._transaction_settings)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    async def open(self, settings: Settings) -> None:
        """Open the driver's pool (DB_POOL_MIN_SIZE connections) on `settings`' database URL.

        DatabaseUnavailable, naming the server, when it cannot be reached in time or refuses.
        """
        assert settings.database_url is not None
        self.settings = settings
        self.turns = Turns(settings.pool_max_size, settings.pool_timeout, self._release_orphan)
        self.deadlines = Deadlines(settings.command_deadline, _cut)
        database = _asyncpg.DriverDatabase(
            settings.database_url,
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            connect_timeout=settings.connect_timeout,
            max_idle=settings.pool_max_idle,
            statement_cache_size=settings.statement_cache_size,
            server_settings=self._startup_settings,
            dead_peer_timeout=settings.dead_peer_timeout,
            on_connection_opened=self.events.connection_opened,
            on_connection_closed=self.events.connection_closed,
        )
        self._database = database
        try:
            with anyio.fail_after(settings.connect_timeout + 1):
                self._pool = await database.connect()
        except Exception as exc:
            if _asyncpg.translate(exc, connecting=True) is None:
                raise
            self._database = None
            raise self.unreachable(exc) from None

    async def close(self) -> None:
        """Close the pool once every connection is back; cut those still busy after
        DB_CONNECT_TIMEOUT."""
        if self._cleanups:
            # Connections still on their way back to the pool: the pool waits for them anyway.
            await asyncio.gather(*list(self._cleanups), return_exceptions=True)
        # The pool stays reachable while it closes: requests cancelled at shutdown may start
        # returning their connections only now, and the close waits for them.
        database, pool = self._database, self._pool
        try:
            if database is not None and pool is not None:
                with anyio.move_on_after(self.settings.connect_timeout) as closing:
                    await database.disconnect()
                if closing.cancelled_caught:
                    logger.warning("connections were still busy at shutdown; cutting them")
                    pool.terminate()
                else:
                    logger.info("database pool closed")
        finally:
            self.deadlines.close()
            self._database = self._pool = None

    def unreachable(self, exc: BaseException) -> DatabaseUnavailable:
        """The error for a server that did not answer or refused a connection, naming it."""
        url = self.settings.database_url or ""
        where = ", ".join(database_hosts(url)) or mask_password(url)
        refused = _asyncpg.refused_startup_setting(exc)
        if refused is not None and not self.settings.pgbouncer:
            return DatabaseUnavailable(
                f"the server at {where} refused the startup parameter {refused}: is this "
                "PgBouncer? set DB_PGBOUNCER=true"
            )
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {self.settings.connect_timeout:g} s (DB_CONNECT_TIMEOUT)"
        return DatabaseUnavailable(f"cannot reach PostgreSQL at {where}: {reason}")

    def begin_statement(self, isolation: str | None) -> str:
        """The BEGIN of a transaction at `isolation` on this pool's connections."""
        if isolation is None:
            return self.plain_begin
        return begin_statement(isolation, self._transaction_settings)

    # -- lending connections --------------------------------------------------------------------

    def _driver_pool(self) -> Pool:
        if self._pool is None:
            raise RuntimeError("the DatabaseClient is not connected; call connect() first")
        return self._pool

    async def acquire(self) -> Connection:
        """A connection, within DB_POOL_TIMEOUT; DatabaseUnavailable (or a kind of it) if none."""
        pool = self._driver_pool()
        wait = self._backoff.wait_left()
        if wait and not pool.get_idle_size():
            # The server refused us moments ago: answer now rather than have every request
            # hammer it with connection attempts while it is down.
            raise DatabaseUnavailable(
                f"PostgreSQL was unreachable moments ago; the next connection attempt is in "
                f"{wait:.1f} s"
            )
        turns = self.turns
        started = time.perf_counter()
        connection = None
        if not turns.take_free():
            limit = self.settings.pool_max_waiting
            if limit and self._waiting >= limit:
                # Backpressure: a queue this long would only turn into timeouts; answer now.
                self.events.acquire_refused()
                raise PoolQueueFull(
                    f"{self._waiting} requests already wait for a database connection "
                    f"(DB_POOL_MAX_WAITING={limit})"
                )
            self._waiting += 1
            try:
                connection = await turns.take()
            except TimeoutError:
                self.events.acquire_timed_out()
                raise PoolTimeout(
                    f"couldn't get a database connection within "
                    f"{self.settings.pool_timeout:.2f} s (DB_POOL_TIMEOUT): all "
                    f"{pool.get_max_size()} pooled connections are busy"
                ) from None
            finally:
                self._waiting -= 1
        if connection is None:
            try:
                # A turn means an idle connection is there, or the pool may open one (bounded
                # by DB_CONNECT_TIMEOUT): this does not queue.
                connection = await pool.acquire()
            except BaseException as exc:
                turns.give_back()
                # A server that refuses the new connection (not accepting connections, too many
                # clients, starting up) is as unavailable as one that does not answer.
                if _asyncpg.translate(exc, connecting=True) is not None:
                    self._backoff.failed()
                    raise self.unreachable(exc) from None
                raise
            self._backoff.succeeded()
        self.events.acquired(time.perf_counter() - started)
        return connection

    async def release(self, connection: Connection, *, broken: bool, session_changed: bool) -> None:
        """Take `connection` back: discard it if broken, reset its session if a statement may
        have changed it, else hand it straight to the oldest waiter or back to the pool.

        Whatever happens, even a cancellation, the turn goes back once the driver has the
        connection back (or it is cut, which gives it back at once).
        """
        try:
            if is_closed(connection):
                self.events.connection_discarded()
                logger.warning("a database connection was lost; the pool will open a new one")
            elif broken or cancel_pending(connection):
                self._discard(connection, "it is broken")
            elif session_changed:
                await self._reset_session(connection)
            elif not connection.is_in_transaction() and not due_for_recycling(connection):
                # Clean and in demand: straight to the next request, as the driver's pool
                # would hand it on anyway.
                if self.turns.hand_over(connection):
                    return
                # Nothing left for the driver's release to do on the wire: no bound (and no
                # timer) is needed.
                await self._driver_release(connection, bound=None)
                self.turns.give_back()
                return
            # In a transaction, or due to close (the driver's close waits for the server's
            # goodbye): bounded.
            await self._driver_release(connection, bound=self.settings.connect_timeout)
        except BaseException:
            self.turns.give_back()
            raise
        self.turns.give_back()

    async def _reset_session(self, connection: Connection) -> None:
        # Undo what the request left in the session (settings, LISTEN, advisory locks...)
        # before anyone else gets the connection.
        try:
            with anyio.fail_after(self.settings.connect_timeout):
                await connection.execute(connection.get_reset_query())
        except BaseException as exc:
            self._discard(connection, f"its session could not be reset ({exc!r})")
            if not isinstance(exc, Exception):
                raise

    async def _driver_release(self, connection: Connection, *, bound: float | None) -> None:
        """Hand `connection` back to the driver's pool (a closed one it only forgets)."""
        # Shielded by the driver: if we are cancelled, its release goes on and ends within
        # `bound` (at once when it is None: then there is nothing to send), so the turn given
        # back meanwhile waits at most that long for the connection.
        try:
            await self._driver_pool().release(connection, timeout=bound)
        except Exception as exc:
            # asyncpg has already terminated the connection; the pool replaces it on demand.
            logger.warning("a connection could not be reset and was discarded: %s", exc)

    def _discard(self, connection: Connection, why: str) -> None:
        self.events.connection_discarded()
        logger.warning("discarding a database connection: %s", why)
        _asyncpg.cut(connection)

    def _release_orphan(self, connection: Connection) -> None:
        # A connection handed to a waiter that was cancelled before it could use it.
        self._spawn(self.release(connection, broken=False, session_changed=False))

    # -- work that outlives its caller ----------------------------------------------------------

    def _spawn(self, work: Awaitable[T]) -> asyncio.Future[T]:
        task = asyncio.ensure_future(work)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    async def finish_in_background(self, work: Awaitable[T]) -> T:
        """Await `work` in a task of its own that goes on if the caller is cancelled meanwhile.

        anyio's shielded scopes stop only anyio's cancellation, not a plain task.cancel(); a
        task under asyncio.shield finishes either way. The pool keeps it referenced until it
        does, and close() waits for it.
        """
        return await asyncio.shield(self._spawn(work))

    @property
    def cleanups_running(self) -> int:
        return len(self._cleanups)

    # -- figures --------------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        pool = self._driver_pool()
        size, idle = pool.get_size(), pool.get_idle_size()
        return PoolStats(
            size=size,
            idle=idle,
            in_use=size - idle,
            max=pool.get_max_size(),
            min=pool.get_min_size(),
            waiting=self._waiting,
        )


def _cut(connection: Connection) -> None:
    # Terminate, never cancel: a cancel request to a frozen server hangs as well.
    _asyncpg.cut(connection)
