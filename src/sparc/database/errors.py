"""The errors the database layer raises; callers never see a driver exception."""

from __future__ import annotations

# The classes are defined here but belong to the public package: tracebacks and reprs name
# `sparc.database.PoolTimeout`, the path users import them from.
_PUBLIC_MODULE = "sparc.database"


class DatabaseUnavailable(Exception):
    """The database cannot serve this now (pool exhausted, server unreachable, connection lost).

    Retrying later may succeed; nothing the failed work wrote was kept.
    """


class PoolTimeout(DatabaseUnavailable):
    """No pooled connection became free within DB_POOL_TIMEOUT."""


class PoolQueueFull(DatabaseUnavailable):
    """DB_POOL_MAX_WAITING requests already wait for a connection; this one is refused at once."""


class StatementTimeout(DatabaseUnavailable):
    """PostgreSQL cancelled a statement that ran past DB_STATEMENT_TIMEOUT."""


class CommandTimeout(DatabaseUnavailable):
    """PostgreSQL did not answer a statement within DB_COMMAND_TIMEOUT (a frozen or unreachable
    server): its connection was cut, never reused."""


class WritesRefused(DatabaseUnavailable):
    """The server refused to write (read_only_sql_transaction): it is a standby, or read-only
    for now (a switchover under way, default_transaction_read_only)."""


class QueryError(Exception):
    """PostgreSQL refused a statement; `sqlstate` is its error code (e.g. 23505)."""

    def __init__(
        self, message: str, *, sqlstate: str | None = None, constraint: str | None = None
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.constraint = constraint


class UniqueViolation(QueryError):
    """A statement broke a unique constraint (SQLSTATE 23505)."""


class TransactionConflict(DatabaseUnavailable, QueryError):
    """The transaction lost a race with another (serialization_failure, deadlock_detected).

    Nothing of it was kept; run again, it will most likely succeed. DatabaseMiddleware replays
    such a request itself where that is safe (see `retry_on_conflict`).
    """


class CommitFailed(Exception):
    """The request's transaction could not be committed: none of its writes were kept."""


for _error in (
    DatabaseUnavailable,
    PoolTimeout,
    PoolQueueFull,
    StatementTimeout,
    CommandTimeout,
    WritesRefused,
    QueryError,
    UniqueViolation,
    TransactionConflict,
    CommitFailed,
):
    _error.__module__ = _PUBLIC_MODULE
