"""Database layer: the process's one connection pool and the unit of work of each request.

This is the only module that imports `databases` or `asyncpg`; replacing the driver means
rewriting this file and nothing else. encode/databases owns the asyncpg pool. Its two gaps are
handled here: it acquires without a timeout (we acquire from its asyncpg pool with
DB_POOL_TIMEOUT) and it binds connections to asyncio tasks (we bind the request's connection to
the request's context instead, so child tasks the request spawns share it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import asyncpg
import databases
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.sql import ClauseElement
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sparc.embedded import embedded_postgres
from sparc.problems import problem_response
from sparc.settings import Settings, mask_password

logger = logging.getLogger("sparc.database")

T = TypeVar("T")
Query = str | ClauseElement
Values = Mapping[str, Any]

# Seen in pg_stat_activity; lets operators (and our tests) count SPARC's own connections.
APPLICATION_NAME = "sparc"


class Row(Protocol):
    """A result row: by column name (`row["email"]`) or position (`row[0]`)."""

    def __getitem__(self, key: str | int, /) -> Any: ...
    def get(self, key: str, default: Any = None, /) -> Any: ...
    def keys(self) -> Iterator[str]: ...
    def values(self) -> Iterator[Any]: ...
    def items(self) -> Iterator[tuple[str, Any]]: ...
    def __len__(self) -> int: ...


class PoolEvents:
    """What the pool reports as it works; the metrics module records these. Does nothing here."""

    def acquired(self, wait_seconds: float) -> None: ...
    def acquire_timed_out(self) -> None: ...
    def acquire_refused(self) -> None: ...
    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...
    def connection_discarded(self) -> None: ...
    def transaction_finished(self, *, committed: bool) -> None: ...
    def transaction_retried(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Errors


class DatabaseUnavailable(Exception):
    """The database cannot serve this now (pool exhausted, server unreachable, connection lost).

    Requests that hit it are answered 503 with Retry-After; retrying later may succeed.
    """

    retry_after = 5


class PoolTimeout(DatabaseUnavailable):
    """No pooled connection became free within DB_POOL_TIMEOUT."""

    retry_after = 1


class PoolQueueFull(DatabaseUnavailable):
    """DB_POOL_MAX_WAITING requests already wait for a connection; this one is refused at once."""

    retry_after = 1


class StatementTimeout(DatabaseUnavailable):
    """PostgreSQL cancelled a statement that ran past DB_STATEMENT_TIMEOUT."""

    retry_after = 1


class QueryError(Exception):
    """PostgreSQL refused a statement; `sqlstate` is its error code (e.g. 23505)."""

    def __init__(self, message: str, *, sqlstate: str | None, constraint: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.constraint = constraint


class UniqueViolation(QueryError):
    """A statement broke a unique constraint (SQLSTATE 23505)."""


class TransactionConflict(DatabaseUnavailable, QueryError):
    """The transaction lost a race with another (serialization_failure, deadlock_detected).

    Nothing of it was kept; run again, it will most likely succeed. DatabaseMiddleware replays
    such a request itself where that is safe (see `retry_on_conflict`), else answers 503.
    """

    retry_after = 1


# serialization_failure, deadlock_detected
_CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})


class CommitFailed(Exception):
    """The request's transaction could not be committed: none of its writes were kept."""


_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.InterfaceError,
    # The protocol lost track of the connection's state (e.g. the server hung up mid-exchange).
    asyncpg.exceptions.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)


_UNREACHABLE: tuple[type[BaseException], ...] = (
    TimeoutError,
    DatabaseUnavailable,
    *_CONNECTION_ERRORS,
)


def _is_closed(connection: Any) -> bool:
    try:
        return bool(connection.is_closed())
    except asyncpg.InterfaceError:
        return True  # asyncpg already handed a connection that closed back to its pool


def _breaks_connection(exc: BaseException) -> bool:
    # A cancelled statement (57014) is filed under "operator intervention" like a server
    # shutdown, but the connection it ran on is fine.
    return isinstance(exc, _CONNECTION_ERRORS) and not isinstance(exc, asyncpg.QueryCanceledError)


def _translate(exc: BaseException) -> BaseException:
    """Map a driver exception to this module's errors, so callers never import asyncpg."""
    if isinstance(exc, asyncpg.QueryCanceledError):
        # statement_timeout (or a cancel request): the connection itself is fine.
        return StatementTimeout(f"the database cancelled a statement: {exc}")
    if isinstance(exc, _CONNECTION_ERRORS):
        return DatabaseUnavailable(f"lost the connection to PostgreSQL: {exc}")
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None)
        error: type[QueryError] = QueryError
        if sqlstate in _CONFLICT_SQLSTATES:
            error = TransactionConflict
        elif isinstance(exc, asyncpg.UniqueViolationError):
            error = UniqueViolation
        return error(
            str(exc),
            sqlstate=getattr(exc, "sqlstate", None),
            constraint=getattr(exc, "constraint_name", None),
        )
    return exc


# ---------------------------------------------------------------------------------------------
# Query preparation: ":name" text or SQLAlchemy Core, both turned into "$n" SQL for asyncpg.

# As in SQLAlchemy's text(), ":name" is a parameter unless escaped as "\:" or glued to a word or
# another colon (so '10:30' and "::type" are left alone); unlike text(), ":name::type" works.
_NAMED_PARAMETER = re.compile(r"(?<![:\w\\]):(\w++)(?!:(?!:))")
_DIALECT = PGDialect_asyncpg()  # type: ignore[no-untyped-call]


@functools.lru_cache(maxsize=2048)
def _compile_text(sql: str) -> tuple[str, tuple[str, ...]]:
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _NAMED_PARAMETER.sub(number, sql).replace("\\:", ":"), tuple(names)


# Statements whose effect can outlive their transaction: session settings, LISTEN, cursors WITH
# HOLD, prepared statements, temporary tables, session advisory locks, and anonymous blocks or
# procedures that could do any of these. Functions called from a query are not looked into.
_SESSION_CHANGE = re.compile(
    r"(?:^|;)\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*"
    r"(?:set(?!\s+(?:local|transaction|constraints)\b)|reset|listen|declare|prepare|load|discard"
    r"|do|call|create\s+(?:(?:global|local)\s+)?temp(?:orary)?)\b"
    r"|\b(?:set_config|pg_(?:try_)?advisory_lock(?:_shared)?)\s*\(",
    re.IGNORECASE | re.DOTALL,
)


@functools.lru_cache(maxsize=2048)
def _changes_session(sql: str) -> bool:
    """Whether `sql` may leave state in the session that the next user of the connection sees."""
    return _SESSION_CHANGE.search(sql) is not None


async def _keep_session(connection: Any) -> None:
    """asyncpg's per-release reset hook: nothing to undo (see DatabaseClient._release)."""


def _prepare(query: Query, values: Values | None) -> tuple[str, list[Any]]:
    if isinstance(query, str):
        sql, names = _compile_text(query)
        given = values or {}
        missing = [name for name in names if name not in given]
        if missing:
            raise ValueError(f"no value given for query parameter(s) {', '.join(missing)}")
        return sql, [given[name] for name in names]
    clause: Any = query
    if values:
        clause = clause.values(**values)  # as in databases: values fill an INSERT or UPDATE
    compiled = clause.compile(dialect=_DIALECT, compile_kwargs={"render_postcompile": True})
    params = compiled.params
    return compiled.string, [params[name] for name in compiled.positiontup or ()]


# ---------------------------------------------------------------------------------------------
# The unit of work: one connection and at most one transaction, shared by every task of a request.


class _UnitEnded(Exception):
    """Internal: the unit of work ended before this statement got its turn."""


_ISOLATION_LEVELS = {
    "read_committed": "READ COMMITTED",
    "repeatable_read": "REPEATABLE READ",
    "serializable": "SERIALIZABLE",
}


class _UnitOfWork:
    """Holds a request's (or a `transaction()` block's) connection and transaction.

    The connection is acquired at the first statement and the transaction begun at the first
    statement that needs one; we issue BEGIN/COMMIT ourselves so that COMMIT's answer is checked
    (PostgreSQL answers ROLLBACK to the COMMIT of a transaction an earlier error aborted). A
    lock serialises statements, because a request's child tasks share its connection and a
    connection runs one statement at a time. Whoever holds the lock once the unit has ended
    returns the connection: end() itself, or, if end() gave up waiting for a statement still
    running in a child task, that task on its way out.
    """

    __slots__ = (
        "_abandoned",
        "_begin",
        "_broken",
        "_connection",
        "_doomed",
        "_in_transaction",
        "_lock",
        "_savepoints",
        "_session_changed",
        "client",
        "conflicted",
        "ended",
        "keep_writes",
    )

    def __init__(self, client: DatabaseClient, *, isolation: str | None = None) -> None:
        self.client = client
        self.keep_writes = False
        self.ended = False
        # A statement lost a race (TransactionConflict), even if the endpoint caught that.
        self.conflicted = False
        self._begin = client._plain_begin if isolation is None else client._begin_sql(isolation)
        self._connection: Any = None
        self._in_transaction = False
        self._lock = asyncio.Lock()
        self._broken = False
        self._doomed = False  # interrupted mid-BEGIN: may neither run statements nor commit
        self._abandoned = False
        self._savepoints = 0
        self._session_changed = False  # a statement may have left state in the session

    @property
    def in_transaction(self) -> bool:
        return self._in_transaction

    def set_isolation(self, isolation: str) -> None:
        if self._in_transaction or self.ended:
            raise RuntimeError("set_isolation() must come before the transaction's first statement")
        self._begin = self.client._begin_sql(isolation)

    async def run(
        self,
        operation: Callable[[Any], Awaitable[T]],
        *,
        transactional: bool,
        sql: str | None = None,
    ) -> T:
        async with self._lock:
            if self.ended:
                raise _UnitEnded
            if self._broken or self._doomed:
                # Never run further statements where the transaction's state is unknown: they
                # might run in autocommit.
                raise DatabaseUnavailable("this request's database connection broke")
            try:
                if self._connection is None:
                    self._connection = await self.client._acquire()
                    if self._abandoned:
                        raise _UnitEnded  # the unit ended while we waited for the pool
                connection = self._connection
                if sql is not None and _changes_session(sql):
                    self._session_changed = True
                try:
                    if transactional and not self._in_transaction:
                        await self._begin_transaction(connection)
                    return await operation(connection)
                except BaseException as exc:
                    if _breaks_connection(exc) or _is_closed(connection):
                        self._broken = True
                    translated = _translate(exc)
                    if isinstance(translated, TransactionConflict):
                        self.conflicted = True
                    if translated is exc:
                        raise
                    raise translated from None
            finally:
                if self._abandoned:
                    await _shielded(self.client, self._release())

    async def _begin_transaction(self, connection: Any) -> None:
        try:
            await connection.execute(self._begin)
        except asyncio.CancelledError:
            # BEGIN may or may not have run. No further statement may run in this unit (it could
            # land in autocommit) and it cannot commit; the cleanup's ROLLBACK closes whatever
            # is open, so the connection itself stays usable.
            self._doomed = self._in_transaction = True
            raise
        except BaseException:
            self._broken = True
            raise
        self._in_transaction = True

    async def end(self, *, commit: bool) -> None:
        """Commit or roll back, then return the connection to the pool (once; later calls no-op).

        A failed commit raises CommitFailed or DatabaseUnavailable. The cleanup runs in a task
        of its own, so it finishes even when the caller is cancelled meanwhile.
        """
        if self.ended:
            return
        self.ended = True
        try:
            if commit and self._in_transaction:
                async with self._lock:
                    await self._commit()
        finally:
            if self._lock.locked() or self._in_transaction or self._broken:
                await _shielded(self.client, self._clean_up())
            elif self._connection is not None:
                # The common case (nothing open, nobody else using the connection): asyncpg
                # shields the release itself, so no task of our own is needed.
                connection, self._connection = self._connection, None
                await self.client._release(
                    connection, broken=False, session_changed=self._session_changed
                )

    async def _commit(self) -> None:
        if self._broken or self._doomed:
            raise DatabaseUnavailable("the transaction was interrupted before commit")
        self._in_transaction = False  # COMMIT ends the transaction whatever it answers
        try:
            status = await self._connection.execute("COMMIT")
        except asyncio.CancelledError:
            # The outcome is unknown to a request that is going away anyway. The cleanup's
            # ROLLBACK (harmless if COMMIT got through) leaves the connection clean, and
            # counts the transaction as rolled back.
            self._in_transaction = True
            raise
        except Exception as exc:
            self.client.events.transaction_finished(committed=False)
            if _breaks_connection(exc) or _is_closed(self._connection):
                self._broken = True
                raise DatabaseUnavailable(
                    f"lost the connection to PostgreSQL during commit: {exc}"
                ) from None
            sqlstate = getattr(exc, "sqlstate", None)
            if sqlstate in _CONFLICT_SQLSTATES:
                # SERIALIZABLE transactions may find out only at COMMIT that they lost.
                raise TransactionConflict(
                    f"the transaction could not be committed: {exc}",
                    sqlstate=sqlstate,
                    constraint=None,
                ) from None
            raise CommitFailed(f"the transaction could not be committed: {exc}") from None
        committed = status == "COMMIT"
        self.client.events.transaction_finished(committed=committed)
        if not committed and self.conflicted:
            raise TransactionConflict(
                "an earlier statement of the transaction lost a race with another transaction, "
                "so PostgreSQL rolled it back",
                sqlstate=None,
                constraint=None,
            )
        if not committed:
            raise CommitFailed(
                "an earlier statement of the transaction failed or was cancelled, "
                "so PostgreSQL rolled the transaction back"
            )

    async def _clean_up(self) -> None:
        with anyio.move_on_after(self.client.settings.connect_timeout) as waiting:
            await self._lock.acquire()
        if waiting.cancelled_caught:
            # A statement from a task the request spawned is still running. Cutting the
            # connection ends it; that task returns the connection on its way out (run()).
            logger.warning("a statement outlived its request; discarding its connection")
            self._abandoned = self._broken = True
            if self._connection is not None and not _is_closed(self._connection):
                self._connection.terminate()
            return
        try:
            await self._release()
        finally:
            self._lock.release()

    async def _release(self) -> None:
        """Roll back what is open and return the connection; the caller holds the lock."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._in_transaction:
            self.client.events.transaction_finished(committed=False)
            if not self._broken:
                with anyio.move_on_after(self.client.settings.connect_timeout) as waiting:
                    try:
                        await connection.execute("ROLLBACK")
                    except Exception as exc:
                        logger.warning("rollback failed (%s); discarding the connection", exc)
                        self._broken = True
                if waiting.cancelled_caught:
                    logger.warning("rollback did not finish in time; discarding the connection")
                    self._broken = True
        self._in_transaction = False
        await self.client._release(
            connection, broken=self._broken, session_changed=self._session_changed
        )

    @contextlib.asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """A nested unit: its statements are undone alone if the block raises."""
        self._savepoints += 1
        name = f"sparc_savepoint_{self._savepoints}"
        await self.run(lambda c: c.execute(f"SAVEPOINT {name}"), transactional=True)
        try:
            yield
        except BaseException:
            try:
                await _shielded(
                    self.client,
                    self.run(
                        lambda c: c.execute(f"ROLLBACK TO SAVEPOINT {name}"), transactional=True
                    ),
                )
            except (Exception, asyncio.CancelledError) as exc:
                # The transaction stays failed, so its COMMIT will fail and nothing is kept.
                logger.warning("rolling back to a savepoint failed: %r", exc)
            raise
        await self.run(lambda c: c.execute(f"RELEASE SAVEPOINT {name}"), transactional=True)


async def _shielded(client: DatabaseClient, work: Awaitable[T]) -> T:
    """Await `work` in a task of its own that goes on if the caller is cancelled meanwhile.

    anyio's shielded scopes stop only anyio's cancellation, not a plain task.cancel(); a task
    under asyncio.shield finishes either way. The client keeps it referenced until it does.
    """
    task = asyncio.ensure_future(work)
    client._cleanups.add(task)
    task.add_done_callback(client._cleanups.discard)
    return await asyncio.shield(task)


_current_client: ContextVar[DatabaseClient | None] = ContextVar("sparc_db_client", default=None)
_current_unit: ContextVar[_UnitOfWork | None] = ContextVar("sparc_unit_of_work", default=None)


def get_db_client() -> DatabaseClient:
    """The DatabaseClient of the current request (the same object for every request of an app)."""
    client = _current_client.get()
    if client is None:
        raise RuntimeError(
            "get_db_client() found no DatabaseClient bound here. Inside a request, add "
            "DatabaseMiddleware to the app (sparc.app.create_app does); outside requests, bind "
            "one with `with bind_db_client(client):` or use the DatabaseClient directly."
        )
    return client


@contextlib.contextmanager
def bind_db_client(client: DatabaseClient) -> Iterator[DatabaseClient]:
    """Make get_db_client() return `client` inside this block (CLI commands, jobs, tests)."""
    token = _current_client.set(client)
    try:
        yield client
    finally:
        _current_client.reset(token)


# ---------------------------------------------------------------------------------------------
# The client


class _ReconnectBackoff:
    """After a failed connection attempt, wait before the next: capped, doubling, jittered."""

    FIRST = 0.1
    CAP = 5.0

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


class _Turns:
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
        self, count: int, timeout: float, on_orphan: Callable[[Any], None] | None = None
    ) -> None:
        self._free = count
        self._timeout = timeout
        # Takes a connection handed to a waiter that was cancelled before it could use it.
        self._on_orphan = on_orphan
        # (deadline, future) in arrival order; futures of waiters that left stay until reached.
        self._waiters: collections.deque[tuple[float, asyncio.Future[Any]]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def take_free(self) -> bool:
        """Take a turn if one is free and nobody waits for it; never blocks."""
        if self._free and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self) -> Any:
        """Wait for a turn: returns the connection handed over with it, or None (then acquire
        one from the pool). TimeoutError after `timeout` seconds without one."""
        if self.take_free():
            return None
        loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
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

    def hand_over(self, connection: Any) -> bool:
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


def _due_for_recycling(connection: Any) -> bool:
    """Whether asyncpg's pool would close `connection` on release (it served max_queries)."""
    try:
        return bool(connection._con._protocol.queries_count >= connection._holder._max_queries)
    except AttributeError:
        # Not laid out as the asyncpg we know: let its pool see every release and decide.
        return True


@dataclass(frozen=True, slots=True)
class ConnectionBudget:
    """How many more connections the server can take for us."""

    max_connections: int
    reserved: int  # superuser_reserved_connections + reserved_connections
    held_by_others: int  # client connections open now, other than the one asking

    @property
    def available(self) -> int:
        return self.max_connections - self.reserved - self.held_by_others


@dataclass(frozen=True, slots=True)
class PoolStats:
    size: int  # open connections
    idle: int
    in_use: int
    max: int
    min: int
    waiting: int  # requests waiting for a connection right now


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
        # The settings in force: once connected to the embedded server, they carry its URL.
        self.settings = settings
        self._database: databases.Database | None = None
        self._embedded: contextlib.ExitStack | None = None
        self._waiting = 0
        self._turns = self._new_turns()
        self._reconnect = _ReconnectBackoff()
        self._cleanups: set[asyncio.Future[Any]] = set()  # units of work still cleaning up
        self._plain_begin = self._begin_sql(None)

    def _new_turns(self) -> _Turns:
        def orphaned(connection: Any) -> None:
            release = self._release(connection, broken=False, session_changed=False)
            task = asyncio.ensure_future(release)
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)

        return _Turns(self.settings.pool_max_size, self.settings.pool_timeout, orphaned)

    def _build_database(self, url: str) -> databases.Database:
        # PgBouncer passes application_name on to the server but refuses other startup
        # settings; behind it the timeouts are set per transaction instead (see _begin_sql).
        server_settings = {"application_name": self.application_name}
        if not self.settings.pgbouncer:
            server_settings.update(self._timeouts())
        dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
        return databases.Database(
            dsn,
            # databases reads only host/user/password from the URL; handing asyncpg the whole
            # DSN as well keeps every libpq URL option (sslmode, several hosts, ...) working.
            dsn=dsn,
            min_size=self.settings.pool_min_size,
            max_size=self.settings.pool_max_size,
            timeout=self.settings.connect_timeout,
            max_inactive_connection_lifetime=self.settings.pool_max_idle,
            statement_cache_size=self.settings.statement_cache_size,
            server_settings=server_settings,
            init=self._connection_opened,
            # asyncpg resets every connection's session on release (RESET ALL and more, a round
            # trip per request); SPARC does that itself only when a statement may have changed
            # the session (see _release).
            reset=_keep_session,
        )

    def _timeouts(self) -> dict[str, str]:
        timeouts = {}
        for name, seconds in (
            ("statement_timeout", self.settings.statement_timeout),
            ("idle_in_transaction_session_timeout", self.settings.idle_in_transaction_timeout),
        ):
            if seconds:
                timeouts[name] = str(math.ceil(seconds * 1000))  # milliseconds
        return timeouts

    def _begin_sql(self, isolation: str | None) -> str:
        sql = "BEGIN"
        if isolation is not None:
            level = _ISOLATION_LEVELS.get(isolation.lower().replace(" ", "_"))
            if level is None:
                raise ValueError(f"unknown isolation level {isolation!r}")
            sql += f" ISOLATION LEVEL {level}"
        if self.settings.pgbouncer:
            # Sent with BEGIN as one simple query: no extra round trip, and the settings last
            # exactly as long as the transaction, on whichever server connection runs it.
            sql += "".join(f"; SET LOCAL {name} = {ms}" for name, ms in self._timeouts().items())
        return sql

    async def _connection_opened(self, connection: Any) -> None:
        self.events.connection_opened()
        connection.add_termination_listener(lambda _: self.events.connection_closed())

    # -- lifecycle ------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the pool (DB_POOL_MIN_SIZE connections) and check that the server answers.

        With no DATABASE_URL the embedded PostgreSQL is started (or joined) first.
        """
        if self._database is not None:
            return
        url = self.settings.database_url
        if url is None:
            self._embedded = contextlib.ExitStack()
            url = await anyio.to_thread.run_sync(
                self._embedded.enter_context, embedded_postgres(self.settings.data_dir)
            )
            self.settings = self.settings.with_database_url(url)
        database = self._build_database(url)
        self._turns = self._new_turns()
        try:
            with anyio.fail_after(self.settings.connect_timeout + 1):
                await database.connect()
            self._database = database
            await self.fetch_val("SELECT 1")
        except _UNREACHABLE as exc:
            await self.disconnect()
            raise DatabaseUnavailable(self._unreachable_message(exc)) from None
        logger.info(
            "database pool open: %s (min %d, max %d connections)",
            self.settings.masked_database_url,
            self.settings.pool_min_size,
            self.settings.pool_max_size,
        )

    async def disconnect(self) -> None:
        if self._cleanups:
            # Connections still on their way back to the pool: the pool waits for them anyway.
            await asyncio.gather(*list(self._cleanups), return_exceptions=True)
        # The pool stays reachable while it closes: requests cancelled at shutdown may start
        # returning their connections only now, and close() waits for them.
        database = self._database
        try:
            if database is not None and database.is_connected:
                pool = database._backend._pool
                # asyncpg's close() waits for every connection to come back, however long.
                with anyio.move_on_after(self.settings.connect_timeout) as closing:
                    await database.disconnect()
                if closing.cancelled_caught:
                    logger.warning("connections were still busy at shutdown; cutting them")
                    pool.terminate()
                else:
                    logger.info("database pool closed")
        finally:
            self._database = None
            embedded, self._embedded = self._embedded, None
            if embedded is not None:
                await anyio.to_thread.run_sync(embedded.close)
            self.settings = self._configured

    async def __aenter__(self) -> DatabaseClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.disconnect()

    def _unreachable_message(self, exc: BaseException) -> str:
        url = urlsplit(self.settings.database_url or "")
        if url.hostname:
            where = f"{url.hostname}:{url.port or 5432}"
        else:
            where = mask_password(self.settings.database_url or "")
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {self.settings.connect_timeout:g} s (DB_CONNECT_TIMEOUT)"
        return f"cannot reach PostgreSQL at {where}: {reason}"

    # -- the pool -------------------------------------------------------------------------------

    def _pool(self) -> Any:
        # databases keeps its asyncpg pool on the backend; it offers no acquire timeout, so we
        # acquire from the pool itself.
        if self._database is None:
            raise RuntimeError("the DatabaseClient is not connected; call connect() first")
        pool = self._database._backend._pool
        if pool is None:
            raise RuntimeError("the DatabaseClient is not connected; call connect() first")
        return pool

    async def _acquire(self) -> Any:
        pool = self._pool()
        wait = self._reconnect.wait_left()
        if wait and not pool.get_idle_size():
            # The server refused us moments ago: answer now rather than have every request
            # hammer it with connection attempts while it is down.
            raise DatabaseUnavailable(
                f"PostgreSQL was unreachable moments ago; the next connection attempt is in "
                f"{wait:.1f} s"
            )
        turns = self._turns
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
                if isinstance(exc, (*_CONNECTION_ERRORS, asyncpg.PostgresError)):
                    self._reconnect.failed()
                    raise DatabaseUnavailable(self._unreachable_message(exc)) from None
                raise
            self._reconnect.succeeded()
        self.events.acquired(time.perf_counter() - started)
        return connection

    async def _release(self, connection: Any, *, broken: bool, session_changed: bool) -> None:
        quiet = False  # nothing left for asyncpg's release to do on the wire
        if _is_closed(connection):
            self.events.connection_discarded()
            logger.warning("a database connection was lost; the pool will open a new one")
        elif broken:
            self.events.connection_discarded()
            logger.warning("discarding a broken database connection")
            connection.terminate()
        elif session_changed:
            # Undo what the request left in the session (settings, LISTEN, advisory locks...)
            # before anyone else gets the connection.
            try:
                with anyio.fail_after(self.settings.connect_timeout):
                    await connection.execute(connection.get_reset_query())
            except Exception as exc:
                logger.warning("could not reset a connection's session (%s); discarding it", exc)
                self.events.connection_discarded()
                connection.terminate()
        else:
            quiet = not connection.is_in_transaction()
            # Clean and in demand: straight to the next request, as asyncpg's pool would
            # hand it on anyway (unless it has served its max_queries and is due to close).
            if quiet and not _due_for_recycling(connection) and self._turns.hand_over(connection):
                return
        try:
            # With every transaction ended, asyncpg's release does no I/O: no timeout (and no
            # timer) is needed then.
            timeout = None if quiet else self.settings.connect_timeout
            await self._pool().release(connection, timeout=timeout)
        except Exception as exc:
            # asyncpg has already terminated the connection; the pool replaces it on demand.
            logger.warning("a connection could not be reset and was discarded: %s", exc)
        finally:
            # Only now, with the connection back in asyncpg's pool, may the next request go.
            self._turns.give_back()

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
        pool = self._pool()
        size, idle = pool.get_size(), pool.get_idle_size()
        return PoolStats(
            size=size,
            idle=idle,
            in_use=size - idle,
            max=pool.get_max_size(),
            min=pool.get_min_size(),
            waiting=self._waiting,
        )

    # -- running statements ---------------------------------------------------------------------

    def _unit(self) -> _UnitOfWork | None:
        unit = _current_unit.get()
        if unit is None or unit.ended or unit.client is not self:
            return None
        return unit

    async def _run(
        self, operation: Callable[[Any], Awaitable[T]], *, transactional: bool, sql: str
    ) -> T:
        unit = self._unit()
        if unit is not None:
            try:
                return await unit.run(operation, transactional=transactional, sql=sql)
            except _UnitEnded:
                pass  # the request ended while this statement queued: run it as after the end
        # No unit of work: this statement alone takes a connection, in autocommit.
        standalone = _UnitOfWork(self)
        try:
            result = await standalone.run(operation, transactional=False, sql=sql)
        finally:
            await standalone.end(commit=False)
        return result

    async def fetch_all(self, query: Query, values: Values | None = None) -> list[Row]:
        sql, args = _prepare(query, values)
        rows = await self._run(lambda c: c.fetch(sql, *args), transactional=True, sql=sql)
        return cast(list[Row], rows)

    async def fetch_one(self, query: Query, values: Values | None = None) -> Row | None:
        sql, args = _prepare(query, values)
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
        sql, args = _prepare(query, values)
        return await self._run(lambda c: c.fetchval(sql, *args), transactional=True, sql=sql)

    async def execute_many(self, query: Query, values: Sequence[Values]) -> None:
        if not values:
            return
        prepared = [_prepare(query, each) for each in values]
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
        sql, args = _prepare(query, values)
        unit = self._unit()
        # Its own unit is not bound to the context: the caller's other queries stay outside it.
        own = unit is None
        if unit is None:
            unit = _UnitOfWork(self)
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
        except _UnitEnded:
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
        sql, args = _prepare(query, values)
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

        unit = _UnitOfWork(self, isolation=isolation)
        token = _current_unit.set(unit)
        try:
            yield
        except BaseException:
            await unit.end(commit=False)
            raise
        else:
            await unit.end(commit=True)
        finally:
            _current_unit.reset(token)


# ---------------------------------------------------------------------------------------------
# The middleware


_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_RETRY_MARK = "__sparc_retry_on_conflict__"
E = TypeVar("E", bound=Callable[..., Any])


def retry_on_conflict(endpoint: E) -> E:
    """Let DatabaseMiddleware replay this endpoint's requests whatever their method.

    Requests with an idempotent method (GET, HEAD, OPTIONS, PUT, DELETE) are replayed after a
    TransactionConflict anyway; mark a POST or PATCH endpoint with this when everything it does
    happens in its transaction (nothing sent elsewhere), so running it again is safe.
    """
    setattr(endpoint, _RETRY_MARK, True)
    return endpoint


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
    ) -> None:
        self.app = app
        self.client = client
        # Told of every HTTP request once it is over: its final scope (with the matched route),
        # the status that went out (500 if none did) and the seconds it took. It spares the
        # metrics a middleware layer of their own.
        self.on_answered = on_answered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            with bind_db_client(self.client):
                await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        client_token = _current_client.set(self.client)
        retries_left = self.client.settings.retry_attempts
        request = _RequestMessages(receive, replayable=retries_left > 0)
        # Each run gets the scope as it arrived: the app adds to it (route, user, state).
        original = {**scope, "state": dict(scope.get("state", {}))} if retries_left else scope
        try:
            while True:
                try:
                    await self._run_once(scope, request, send, may_retry=retries_left > 0)
                    return
                except _Replay:
                    retries_left -= 1
                    self.client.events.transaction_retried()
                    request.rewind()
                    scope = {**original, "state": dict(original.get("state", {}))}
                    # A moment's jitter, so the transactions that collided do not collide again.
                    await asyncio.sleep(random.uniform(0, 0.005))
        finally:
            _current_client.reset(client_token)
            if self.on_answered is not None:
                # No status went out: the exception reaches ServerErrorMiddleware, which
                # answers 500.
                status = request.response_status or 500
                self.on_answered(scope, status, time.perf_counter() - started)

    async def _run_once(
        self, scope: Scope, request: _RequestMessages, send: Send, *, may_retry: bool
    ) -> None:
        unit = _UnitOfWork(self.client)
        unit_token = _current_unit.set(unit)
        response_started = False
        replaced = False

        async def send_ending_transaction(message: Message) -> None:
            nonlocal response_started, replaced
            if replaced:
                return  # our error answer replaced the endpoint's; drop the rest of it
            if message["type"] == "http.response.start":
                status = message["status"]
                if status >= 400 and unit.conflicted and may_retry and _may_replay(scope, request):
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
                    if conflict and may_retry and _may_replay(scope, request):
                        # Nothing went out yet: stop this run's response and start over.
                        raise _Replay from None
                    replaced = True
                    response_started = True
                    logger.error("%s; answering 5xx instead of %d", exc, status)
                    await _answer_error(exc, scope, request, send)
                    # Stop the endpoint's response there: its background tasks must not run
                    # for a request whose writes were lost.
                    raise _ResponseReplaced from None
                response_started = True
                request.response_status = status
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
            if conflict and may_retry and _may_replay(scope, request):
                raise _Replay from None
            # Info, not warning: under overload this fires for every refused request.
            logger.info("answering 503: %s", exc)
            await _answer_error(exc, scope, request, send)
        except BaseException as exc:
            await unit.end(commit=False)
            if not unit.conflicted or response_started or not isinstance(exc, Exception):
                raise
            # A lost race that reached us wrapped (e.g. in a task group's ExceptionGroup).
            if may_retry and _may_replay(scope, request):
                raise _Replay from None
            logger.info("answering 503: a lost race ended in %r", exc)
            lost = TransactionConflict(
                "the request's transaction lost a race with another transaction",
                sqlstate=None,
                constraint=None,
            )
            await _answer_error(lost, scope, request, send)
        else:
            await unit.end(commit=False)  # no-op unless the app sent no response at all
        finally:
            _current_unit.reset(unit_token)


def _may_replay(scope: Scope, request: _RequestMessages) -> bool:
    """Whether running the request again is safe (its transaction lost a race)."""
    if not request.can_replay():
        return False
    if scope["method"] in _IDEMPOTENT_METHODS:
        return True
    # The router has put the matched endpoint in the scope by now.
    return getattr(scope.get("endpoint"), _RETRY_MARK, False) is True


class _Replay(Exception):
    """Internal: the request's transaction lost a race; run the request again."""


class _ResponseReplaced(Exception):
    """Internal: the commit failed and a 5xx went out instead of the endpoint's response."""


async def _answer_error(
    exc: Exception, scope: Scope, request: _RequestMessages, send: Send
) -> None:
    """Answer with the problem `exc` calls for, in place of the endpoint's response."""
    if isinstance(exc, DatabaseUnavailable):
        response = problem_response(
            503,
            str(exc),
            title=(
                "Transaction conflict"
                if isinstance(exc, TransactionConflict)
                else "Database unavailable"
            ),
            headers={"Retry-After": str(exc.retry_after)},
        )
    else:
        response = problem_response(
            500, "The request's changes could not be saved; nothing was kept."
        )
    request.response_status = response.status_code
    await response(scope, request.receive, send)


# A request body is kept for a replay up to this size; a larger one makes its request final.
_REPLAYABLE_BODY_LIMIT = 1024 * 1024


class _RequestMessages:
    """Wraps `receive`: tells, before a commit, whether the client left; keeps the body for a
    replay of the request. Also notes the status of the response that went out."""

    __slots__ = (
        "_body_read",
        "_delivered",
        "_delivered_bytes",
        "_gone",
        "_pending",
        "_receive",
        "_replay",
        "response_status",
    )

    def __init__(self, receive: Receive, *, replayable: bool) -> None:
        self._receive = receive
        self.response_status = 0  # none sent yet
        self._pending: list[Message] = []  # messages we peeked at, handed to the endpoint next
        # The body messages the endpoint got, kept only where a replay may need them again.
        self._delivered: list[Message] | None = [] if replayable else None
        self._delivered_bytes = 0
        self._replay: list[Message] = []
        self._body_read = False
        self._gone = False

    async def receive(self) -> Message:
        if self._replay:
            return self._replay.pop(0)
        message = self._pending.pop(0) if self._pending else await self._receive()
        self._note(message)
        if self._delivered is not None and message["type"] == "http.request":
            self._delivered_bytes += len(message.get("body", b""))
            if self._delivered_bytes > _REPLAYABLE_BODY_LIMIT:
                self._delivered = None  # too big to keep for a replay: this one has none
            else:
                self._delivered.append(message)
        return message

    def can_replay(self) -> bool:
        """The client is still there and the endpoint read the whole body or none of it."""
        if self._gone or self._delivered is None:
            return False
        return not self._delivered or not self._delivered[-1].get("more_body", False)

    def rewind(self) -> None:
        """Hand the next run the body messages this one got, then what comes after them."""
        self._replay = list(self._delivered or ())

    def _note(self, message: Message) -> None:
        if message["type"] == "http.disconnect":
            self._gone = True
        elif not message.get("more_body", False):
            self._body_read = True

    async def client_gone(self) -> bool:
        """True if the client has disconnected; never blocks and never loses a message."""
        if not self._gone and not self._body_read:
            # An unread body must be peeked past first: only after it can a disconnect show.
            await self._peek()
        if not self._gone and self._body_read:
            await self._peek()
        return self._gone

    async def _peek(self) -> None:
        # An already-cancelled scope: receive() returns only a message that is ready right now.
        with anyio.CancelScope() as scope:
            scope.cancel()
            message = await self._receive()
            self._pending.append(message)
            self._note(message)
