"""The unit of work: one connection and at most one transaction, shared by every task of a
request (or of a `transaction()` block)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio

from sparc.database import _asyncpg
from sparc.database.driver import Connection
from sparc.database.errors import (
    CommandTimeout,
    CommitFailed,
    DatabaseUnavailable,
    TransactionConflict,
)
from sparc.database.pool import ConnectionPool
from sparc.database.sql import changes_session
from sparc.database.states import LIFECYCLE_MOVES, TRANSACTION_MOVES, Lifecycle, Transaction

logger = logging.getLogger("sparc.database")

T = TypeVar("T")


class UnitEnded(Exception):
    """The unit of work ended before this statement got its turn: run it outside the unit."""


_NONE, _OPEN = Transaction.NONE, Transaction.OPEN
_INTERRUPTED, _BROKEN = Transaction.INTERRUPTED, Transaction.BROKEN
_ACTIVE, _ENDED, _ABANDONED = Lifecycle.ACTIVE, Lifecycle.ENDED, Lifecycle.ABANDONED
_LOST, _DISCARD = _asyncpg.Fate.LOST, _asyncpg.Fate.DISCARD


class UnitOfWork:
    """Holds a request's (or a `transaction()` block's) connection and transaction.

    The connection is acquired at the first statement and the transaction begun at the first
    statement that needs one; BEGIN and COMMIT are sent by the unit itself so that COMMIT's
    answer is checked (PostgreSQL answers ROLLBACK to the COMMIT of a transaction an earlier
    error aborted). A lock serialises statements, because a request's child tasks share its
    connection and a connection runs one statement at a time. Whoever holds the lock once the
    unit has ended returns the connection: end() itself, or, if end() gave up waiting for a
    statement still running in a child task, that task on its way out.
    """

    __slots__ = (
        "_begin",
        "_connection",
        "_discard",
        "_lock",
        "_savepoints",
        "_session_changed",
        "_statement_interrupted",
        "_transaction_lost",
        "conflicted",
        "keep_writes",
        "lifecycle",
        "pool",
        "transaction",
    )

    def __init__(self, pool: ConnectionPool, *, isolation: str | None = None) -> None:
        self.pool = pool
        self.keep_writes = False
        # A statement lost a race (TransactionConflict), even if the endpoint caught that.
        self.conflicted = False
        self.lifecycle = _ACTIVE
        self.transaction = _NONE
        self._begin = pool.plain_begin if isolation is None else pool.begin_statement(isolation)
        self._connection: Connection | None = None
        self._lock = asyncio.Lock()
        self._savepoints = 0
        self._session_changed = False  # a statement may have left state in the session
        # The connection broke while a transaction was open: its writes are gone.
        self._transaction_lost = False
        # A statement was cancelled midway: PostgreSQL must confirm the connection is idle
        # before anyone else gets it.
        self._statement_interrupted = False
        # The connection answered from a server that refuses writes: not to be reused.
        self._discard = False

    @property
    def in_transaction(self) -> bool:
        """A transaction was begun and has not ended (it may since have been interrupted or
        lost with its connection: then it cannot commit)."""
        transaction = self.transaction
        return transaction is _OPEN or transaction is _INTERRUPTED or self._transaction_lost

    def _move(self, to: Transaction) -> None:
        if to not in TRANSACTION_MOVES[self.transaction]:
            raise AssertionError(f"a unit of work cannot go from {self.transaction} to {to}")
        self.transaction = to

    def _break(self) -> None:
        """The connection failed: what was open is lost, counted as rolled back."""
        if self.transaction is _BROKEN:
            return
        if self.transaction is not _NONE:
            self._transaction_lost = True
            self.pool.events.transaction_finished(committed=False)
        self._move(_BROKEN)

    def _end_as(self, to: Lifecycle) -> None:
        if to not in LIFECYCLE_MOVES[self.lifecycle]:
            raise AssertionError(f"a unit of work cannot go from {self.lifecycle} to {to}")
        self.lifecycle = to

    def set_isolation(self, isolation: str) -> None:
        if self.transaction is not _NONE or self.lifecycle is not _ACTIVE:
            raise RuntimeError("set_isolation() must come before the transaction's first statement")
        self._begin = self.pool.begin_statement(isolation)

    async def run(
        self,
        operation: Callable[[Connection], Awaitable[T]],
        *,
        transactional: bool,
        sql: str | None = None,
    ) -> T:
        async with self._lock:
            if self.lifecycle is not _ACTIVE:
                raise UnitEnded
            if self.transaction is _BROKEN or self.transaction is _INTERRUPTED:
                # Never run further statements where the transaction's state is unknown: they
                # might run in autocommit.
                raise DatabaseUnavailable("this request's database connection broke")
            try:
                if self._connection is None:
                    self._connection = await self.pool.acquire()
                    if self.lifecycle is _ABANDONED:
                        raise UnitEnded  # the unit ended while we waited for the pool
                connection = self._connection
                if self._statement_interrupted:
                    await self._confirm_idle(connection)
                if sql is not None and changes_session(sql):
                    self._session_changed = True
                deadlines = self.pool.deadlines
                deadlines.start(connection)
                try:
                    if transactional and self.transaction is _NONE:
                        await self._begin_transaction(connection)
                    result = await operation(connection)
                except BaseException as exc:
                    if not deadlines.finish(connection):
                        self._break()
                        raise self._timed_out() from None
                    self._note_failure(exc, connection)
                    translated = _asyncpg.translate(exc)
                    if translated is None:
                        raise
                    if isinstance(translated, TransactionConflict):
                        self.conflicted = True
                    raise translated from None
                if not deadlines.finish(connection):
                    self._break()  # answered just as its deadline cut the connection
                return result
            finally:
                if self.lifecycle is _ABANDONED:
                    await self.pool.finish_in_background(self._release())

    def _note_failure(self, exc: BaseException, connection: Connection) -> None:
        """What a failed statement tells about the connection it ran on."""
        if isinstance(exc, asyncio.CancelledError):
            self._statement_interrupted = True
        fate = _asyncpg.connection_fate(exc)
        if fate is _LOST or _asyncpg.is_closed(connection):
            self._break()
        elif fate is _DISCARD:
            self._discard = True

    async def _confirm_idle(self, connection: Connection) -> None:
        """After a cancelled statement, wait for PostgreSQL to answer before the next one.

        The driver holds the next statement until the cancelled one is over, and a connection
        cut meanwhile would not release it: no deadline could bound it. So the wait is bounded
        here, and a connection that stays silent is cut.
        """
        if not await self._answered(connection, "SELECT 1"):
            self._break()
            raise DatabaseUnavailable(
                "PostgreSQL did not answer after a cancelled statement; the connection was cut"
            )
        self._statement_interrupted = False

    def _timed_out(self) -> CommandTimeout:
        return CommandTimeout(
            f"PostgreSQL did not answer within {self.pool.deadlines.timeout:g} s "
            "(DB_COMMAND_TIMEOUT); the connection was cut"
        )

    async def _begin_transaction(self, connection: Connection) -> None:
        try:
            await connection.execute(self._begin)
        except asyncio.CancelledError:
            self._move(_INTERRUPTED)  # BEGIN may or may not have run
            raise
        except BaseException:
            self._break()
            raise
        self._move(_OPEN)

    async def end(self, *, commit: bool) -> None:
        """Commit or roll back, then return the connection to the pool (once; later calls no-op).

        A failed commit raises CommitFailed or DatabaseUnavailable. The clean-up runs in a task
        of its own, so it finishes even when the caller is cancelled meanwhile.
        """
        if self.lifecycle is not _ACTIVE:
            return
        self.lifecycle = _ENDED  # the one legal move from ACTIVE
        try:
            if commit and self.in_transaction:
                async with self._lock:
                    await self._commit()
        finally:
            if self._lock.locked() or self.transaction is not _NONE or self._statement_interrupted:
                await self.pool.finish_in_background(self._clean_up())
            elif self._connection is not None:
                # The common case (nothing open, nobody else using the connection): the
                # driver's pool shields the release itself, so no task of our own is needed.
                connection, self._connection = self._connection, None
                await self.pool.release(
                    connection, broken=self._discard, session_changed=self._session_changed
                )

    async def _commit(self) -> None:
        if self.transaction is not _OPEN:
            raise DatabaseUnavailable("the transaction was interrupted before commit")
        connection = self._connection
        assert connection is not None
        deadlines = self.pool.deadlines
        deadlines.start(connection)
        try:
            status = await connection.execute("COMMIT")
        except asyncio.CancelledError:
            deadlines.finish(connection)
            # The outcome is unknown to a request that is going away anyway. The clean-up's
            # ROLLBACK (harmless if COMMIT got through) leaves the connection clean, and
            # counts the transaction as rolled back.
            self._move(_INTERRUPTED)
            raise
        except Exception as exc:
            if not deadlines.finish(connection):
                self._break()
                raise self._timed_out() from None
            if _asyncpg.connection_lost(exc) or _asyncpg.is_closed(connection):
                self._break()
                raise DatabaseUnavailable(
                    f"lost the connection to PostgreSQL during commit: {exc}"
                ) from None
            # PostgreSQL ended the transaction: COMMIT failed, so it rolled back.
            self.pool.events.transaction_finished(committed=False)
            self._move(_NONE)
            if _asyncpg.connection_fate(exc) is _DISCARD:
                self._discard = True
            translated = _asyncpg.translate(exc)
            message = f"the transaction could not be committed: {exc}"
            if isinstance(translated, TransactionConflict):
                # SERIALIZABLE transactions may find out only at COMMIT that they lost.
                raise TransactionConflict(message, sqlstate=translated.sqlstate) from None
            if isinstance(translated, DatabaseUnavailable):
                # A deferred check that found no lock in time, a full disk, a read-only server:
                # as unavailable at COMMIT as at any other statement.
                raise type(translated)(message) from None
            raise CommitFailed(message) from None
        if not deadlines.finish(connection):
            self._discard = True  # answered just as its deadline cut the connection
        self._move(_NONE)  # COMMIT ends the transaction whatever it answers
        committed = status == "COMMIT"
        self.pool.events.transaction_finished(committed=committed)
        if not committed and self.conflicted:
            raise TransactionConflict(
                "an earlier statement of the transaction lost a race with another transaction, "
                "so PostgreSQL rolled it back"
            )
        if not committed:
            raise CommitFailed(
                "an earlier statement of the transaction failed or was cancelled, "
                "so PostgreSQL rolled the transaction back"
            )

    async def _clean_up(self) -> None:
        with anyio.move_on_after(self.pool.settings.connect_timeout) as waiting:
            await self._lock.acquire()
        if waiting.cancelled_caught:
            if self._lock.locked():
                # A statement from a task the request spawned is still running. Cutting the
                # connection ends it; that task, which holds the lock, notes the break and
                # returns the connection on its way out (run()).
                logger.warning("a statement outlived its request; discarding its connection")
                self._end_as(_ABANDONED)
                if self._connection is not None:
                    _asyncpg.cut(self._connection)
                return
            # The statement ended just as the wait ran out: release as usual.
            await self._lock.acquire()
        try:
            await self._release()
        finally:
            self._lock.release()

    async def _release(self) -> None:
        """Roll back what is open and return the connection; the caller holds the lock."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self.transaction is _OPEN or self.transaction is _INTERRUPTED:
            self.pool.events.transaction_finished(committed=False)
            # Also confirms the connection is idle: the answer comes after everything before it.
            confirmed = await self._answered(connection, "ROLLBACK")
            self._move(_NONE if confirmed else _BROKEN)  # counted as rolled back either way
        elif (
            # A statement cancelled outside a transaction: hand the connection on only once
            # PostgreSQL has answered the next one.
            self._statement_interrupted
            and self.transaction is _NONE
            and not await self._answered(connection, "SELECT 1")
        ):
            self._move(_BROKEN)
        await self.pool.release(
            connection,
            broken=self.transaction is _BROKEN or self._discard,
            session_changed=self._session_changed,
        )

    async def _answered(self, connection: Connection, sql: str) -> bool:
        """Whether PostgreSQL answered `sql` (an error is an answer too) within
        DB_CONNECT_TIMEOUT, so the connection is idle; else it is to be discarded."""
        with anyio.move_on_after(self.pool.settings.connect_timeout):
            try:
                await connection.execute(sql)
                return True
            except Exception as exc:
                if _asyncpg.connection_lost(exc) or _asyncpg.is_closed(connection):
                    logger.warning("%s failed (%s); discarding the connection", sql, exc)
                    return False
                return True
        logger.warning("%s had no answer in time; discarding the connection", sql)
        return False

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
                await self.pool.finish_in_background(
                    self.run(
                        lambda c: c.execute(f"ROLLBACK TO SAVEPOINT {name}"), transactional=True
                    ),
                )
            except (Exception, asyncio.CancelledError) as exc:
                # The transaction stays failed, so its COMMIT will fail and nothing is kept.
                logger.warning("rolling back to a savepoint failed: %r", exc)
            raise
        await self.run(lambda c: c.execute(f"RELEASE SAVEPOINT {name}"), transactional=True)
