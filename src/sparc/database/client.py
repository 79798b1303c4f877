"""DatabaseClient: the process's database, its lifecycle and the query API every request uses."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from sparc.database.context import current_unit
from sparc.database.driver import Connection, Row
from sparc.database.events import PoolEvents
from sparc.database.pool import ConnectionPool, PoolStats
from sparc.database.sql import Query, Values, prepare
from sparc.database.states import Lifecycle
from sparc.database.unit import UnitEnded, UnitOfWork
from sparc.embedded import database_settings_async
from sparc.settings import Settings

logger = logging.getLogger("sparc.database")

T = TypeVar("T")
_ACTIVE = Lifecycle.ACTIVE

# Seen in pg_stat_activity; lets operators (and our tests) count SPARC's own connections.
APPLICATION_NAME = "sparc"


@dataclass(frozen=True, slots=True)
class ConnectionBudget:
    """How many more connections the server can take for us."""

    max_connections: int
    reserved: int  # superuser_reserved_connections + reserved_connections
    held_by_others: int  # client connections open now, other than the one asking

    @property
    def available(self) -> int:
        return self.max_connections - self.reserved - self.held_by_others


class DatabaseClient:
    """The process's database: one bounded pool, and the query API every request uses.

    Inside a request (or an `async with client.transaction():` block) every query runs on that
    unit of work's connection and transaction; anywhere else each query takes a pooled connection
    for its own duration and runs in autocommit.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        events: PoolEvents | None = None,
        application_name: str = APPLICATION_NAME,
    ) -> None:
        self.events = events or PoolEvents()
        self.application_name = application_name
        self._configured = settings
        # The settings in force: while connected, they carry the database URL in use.
        self.settings = settings
        self.pool = ConnectionPool(settings, self.events, application_name)
        self._embedded: contextlib.AsyncExitStack | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def connect(self, *, database_url: str | None = None) -> None:
        """Open the pool (DB_POOL_MIN_SIZE connections) and check that the server answers.

        `database_url` stands in for the settings' (the app's lifespan passes the embedded
        server's); one of them must name the database. DatabaseUnavailable if it cannot be
        reached.
        """
        if self.pool.is_open:
            return
        url = database_url or self._configured.database_url
        if url is None:
            raise RuntimeError(
                "DatabaseClient.connect() needs a database URL: set DATABASE_URL, pass "
                "database_url=, or use `async with DatabaseClient(settings)`, which starts the "
                "embedded PostgreSQL"
            )
        self.settings = self._configured.with_database_url(url)
        try:
            await self.pool.open(self.settings)
            await self.fetch_val("SELECT 1")
        except BaseException:
            await self.disconnect()
            raise
        logger.info(
            "database pool open: %s (min %d, max %d connections)",
            self.settings.masked_database_url,
            self.settings.pool_min_size,
            self.settings.pool_max_size,
        )

    async def disconnect(self) -> None:
        try:
            await self.pool.close()
        finally:
            self.settings = self._configured
            embedded, self._embedded = self._embedded, None
            if embedded is not None:
                await embedded.aclose()

    async def __aenter__(self) -> DatabaseClient:
        """Connect; with no DATABASE_URL, start (or join) the embedded PostgreSQL first and
        stop it again on the way out."""
        if self.pool.is_open:
            return self
        embedded = contextlib.AsyncExitStack()
        settings = await embedded.enter_async_context(database_settings_async(self._configured))
        self._embedded = embedded
        await self.connect(database_url=settings.database_url)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.disconnect()

    # -- the pool -------------------------------------------------------------------------------

    async def connection_budget(self) -> ConnectionBudget:
        row = await self.fetch_one(
            """
            SELECT current_setting('max_connections')::int AS max_connections,
                   current_setting('superuser_reserved_connections')::int
                   + coalesce(current_setting('reserved_connections', true)::int, 0) AS reserved,
                   (SELECT count(*) FROM pg_stat_activity
                    WHERE backend_type = 'client backend' AND pid <> pg_backend_pid())::int
                   AS held_by_others
            """
        )
        assert row is not None
        return ConnectionBudget(row["max_connections"], row["reserved"], row["held_by_others"])

    def pool_stats(self) -> PoolStats:
        return self.pool.stats()

    # -- running statements ---------------------------------------------------------------------

    def _unit(self) -> UnitOfWork | None:
        unit = current_unit.get()
        if unit is None or unit.lifecycle is not _ACTIVE or unit.pool is not self.pool:
            return None
        return unit

    async def _run(
        self, operation: Callable[[Connection], Awaitable[T]], *, transactional: bool, sql: str
    ) -> T:
        unit = self._unit()
        if unit is not None:
            try:
                return await unit.run(operation, transactional=transactional, sql=sql)
            except UnitEnded:
                pass  # the request ended while this statement queued: run it as after the end
        # No unit of work: this statement alone takes a connection, in autocommit.
        standalone = UnitOfWork(self.pool)
        try:
            result = await standalone.run(operation, transactional=False, sql=sql)
        finally:
            await standalone.end(commit=False)
        return result

    async def fetch_all(self, query: Query, values: Values | None = None) -> list[Row]:
        sql, args = prepare(query, values)
        rows = await self._run(lambda c: c.fetch(sql, *args), transactional=True, sql=sql)
        return cast(list[Row], rows)

    async def fetch_one(self, query: Query, values: Values | None = None) -> Row | None:
        sql, args = prepare(query, values)
        return cast(
            Row | None,
            await self._run(lambda c: c.fetchrow(sql, *args), transactional=True, sql=sql),
        )

    async def fetch_val(
        self, query: Query, values: Values | None = None, column: int | str = 0
    ) -> Any:
        row = await self.fetch_one(query, values)
        return None if row is None else row[column]

    async def execute(self, query: Query, values: Values | None = None) -> Any:
        """Run a statement; returns the first column of its first row (e.g. RETURNING id)."""
        sql, args = prepare(query, values)
        return await self._run(lambda c: c.fetchval(sql, *args), transactional=True, sql=sql)

    async def execute_many(self, query: Query, values: Sequence[Values]) -> None:
        if not values:
            return
        prepared = [prepare(query, each) for each in values]
        sql = prepared[0][0]
        if any(each_sql != sql for each_sql, _ in prepared):
            # A Core statement compiles per value set; differing keys give differing SQL.
            raise ValueError("execute_many() needs the same keys in every value set")
        await self._run(
            lambda c: c.executemany(sql, [args for _, args in prepared]),
            transactional=True,
            sql=sql,
        )

    async def iterate(
        self, query: Query, values: Values | None = None, *, batch_size: int = 100
    ) -> AsyncIterator[Row]:
        """Stream rows through a server-side cursor, `batch_size` rows per round trip.

        Outside a unit of work the cursor gets a transaction and connection of its own, held
        until the loop ends: leave a loop early inside `contextlib.aclosing(...)`.
        """
        sql, args = prepare(query, values)
        unit = self._unit()
        # Its own unit is not bound to the context: the caller's other queries stay outside it.
        own = unit is None
        if unit is None:
            unit = UnitOfWork(self.pool)
        try:
            cursor = await unit.run(lambda c: c.cursor(sql, *args), transactional=True, sql=sql)
            while True:
                # The lock is held per batch, not across the loop body, so the caller may run
                # other queries between rows.
                rows = await unit.run(lambda c: cursor.fetch(batch_size), transactional=True)
                for row in rows:
                    yield cast(Row, row)
                if len(rows) < batch_size:
                    break
        except UnitEnded:
            raise RuntimeError(
                "the request's transaction ended (its response started) during iterate()"
            ) from None
        except BaseException:
            if own:
                await unit.end(commit=False)
            raise
        if own:
            await unit.end(commit=True)

    async def fetch_one_before_transaction(
        self, query: Query, values: Values | None = None
    ) -> Row | None:
        """A single read on the request's connection that opens no transaction.

        For lookups that run before the endpoint (the authentication backend's token lookup):
        a request whose endpoint makes no query of its own then pays no BEGIN/COMMIT. Once the
        request's transaction has begun, the read simply runs inside it.
        """
        sql, args = prepare(query, values)
        return cast(
            Row | None,
            await self._run(lambda c: c.fetchrow(sql, *args), transactional=False, sql=sql),
        )

    def set_isolation(self, isolation: str) -> None:
        """Run this request's transaction at `isolation`: "serializable", "repeatable_read" or
        "read_committed". Call it before the request's first statement.

        Under "serializable", a request that loses a race is replayed (see retry_on_conflict).
        """
        unit = self._unit()
        if unit is None:
            raise RuntimeError(
                "set_isolation() only applies inside a request; elsewhere use "
                "transaction(isolation=...)"
            )
        unit.set_isolation(isolation)

    def keep_writes(self) -> None:
        """Commit this request's writes even though it answers 4xx (e.g. a failed-login count).

        An unhandled exception or a 5xx answer still rolls everything back.
        """
        unit = self._unit()
        if unit is None:
            raise RuntimeError("keep_writes() only applies inside a request's unit of work")
        unit.keep_writes = True

    @contextlib.asynccontextmanager
    async def transaction(self, *, isolation: str | None = None) -> AsyncIterator[None]:
        """A unit of work: commits when the block ends normally, rolls back when it raises.

        Outside a request this takes one connection for the block (queries from tasks started
        inside share it). Inside a request or another transaction it is a savepoint.
        """
        unit = self._unit()
        if unit is not None:
            if isolation is not None:
                raise ValueError("isolation can only be set on the outermost transaction")
            async with unit.savepoint():
                yield
            return

        unit = UnitOfWork(self.pool, isolation=isolation)
        token = current_unit.set(unit)
        try:
            yield
        except BaseException:
            await unit.end(commit=False)
            raise
        else:
            await unit.end(commit=True)
        finally:
            current_unit.reset(token)
