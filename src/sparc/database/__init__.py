"""SPARC's database layer: one bounded pool per process and a unit of work per request.

The layout, one concept per module:
- `errors`: the exceptions callers see (never a driver's).
- `sql`: `:name` text and SQLAlchemy Core turned into `$n` SQL; BEGIN; session changes.
- `driver`: Protocols for the driver objects SPARC calls.
- `_asyncpg`: the driver boundary, the only importer of asyncpg and encode/databases.
- `turns`: connection turns, first come first served, under one timer.
- `deadlines`: the client-side deadline of every statement, under one timer.
- `pool`: acquire, release, hand-over, reconnect backoff, clean-ups, figures.
- `states`: the unit of work's named states and their legal moves.
- `unit`: the unit of work.
- `context`: the context variables, `get_db_client`, `bind_db_client`.
- `client`: `DatabaseClient`, the lifecycle and the query API.
- `replay`: `retry_on_conflict`, when a replay is safe, the body kept for it.
- `middleware`: `DatabaseMiddleware`, where database errors become HTTP answers.
"""

from sparc.database._asyncpg import migration_engine_arguments
from sparc.database.client import APPLICATION_NAME, ConnectionBudget, DatabaseClient
from sparc.database.context import bind_db_client, get_db_client
from sparc.database.driver import Row
from sparc.database.errors import (
    CommandTimeout,
    CommitFailed,
    DatabaseUnavailable,
    PoolQueueFull,
    PoolTimeout,
    QueryError,
    StatementTimeout,
    TransactionConflict,
    UniqueViolation,
    WritesRefused,
)
from sparc.database.events import PoolEvents
from sparc.database.middleware import DatabaseMiddleware
from sparc.database.pool import PoolStats
from sparc.database.replay import retry_on_conflict
from sparc.database.sql import Query, Values

__all__ = [
    "APPLICATION_NAME",
    "CommandTimeout",
    "CommitFailed",
    "ConnectionBudget",
    "DatabaseClient",
    "DatabaseMiddleware",
    "DatabaseUnavailable",
    "PoolEvents",
    "PoolQueueFull",
    "PoolStats",
    "PoolTimeout",
    "Query",
    "QueryError",
    "Row",
    "StatementTimeout",
    "TransactionConflict",
    "UniqueViolation",
    "Values",
    "WritesRefused",
    "bind_db_client",
    "get_db_client",
    "migration_engine_arguments",
    "retry_on_conflict",
]
