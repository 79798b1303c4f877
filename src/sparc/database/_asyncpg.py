"""The driver boundary: the only module that imports asyncpg or encode/databases.

encode/databases owns the process's asyncpg pool. Two of its gaps are closed elsewhere in the
package and need a reach past its public API, made here and nowhere else: it acquires without a
timeout (SPARC acquires from the asyncpg pool itself, see `pool_of`), and it cannot tell whether a
connection is due to be recycled (`due_for_recycling`). The rest of the package sees driver
objects only through the Protocols of `sparc.database.driver`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
import databases
from sqlalchemy.engine import URL, make_url

from sparc.database.driver import Connection, Pool
from sparc.database.errors import (
    DatabaseUnavailable,
    QueryError,
    StatementTimeout,
    TransactionConflict,
    UniqueViolation,
)

_POSTGRESQL_SCHEMES = ("postgresql+asyncpg://", "postgresql://")


@dataclass(frozen=True, slots=True)
class _Meaning:
    """What a driver exception means to SPARC."""

    error: type[Exception]
    # The connection it happened on cannot be trusted with another statement.
    connection_lost: bool
    # How the SPARC error reads; `{exc}` is the driver's message.
    message: str = "{exc}"


_LOST = "lost the connection to PostgreSQL: {exc}"

# Every driver exception SPARC knows, looked up along the exception's MRO (the most specific
# class wins), so a new asyncpg subclass finds its parent's meaning.
_MEANINGS: dict[type[BaseException], _Meaning] = {
    # statement_timeout or a cancel request: the connection itself is fine.
    asyncpg.QueryCanceledError: _Meaning(
        StatementTimeout, False, "the database cancelled a statement: {exc}"
    ),
    # Server shutdown or crash (57P01, 57P02), not accepting connections yet (57P03).
    asyncpg.exceptions.OperatorInterventionError: _Meaning(DatabaseUnavailable, True, _LOST),
    asyncpg.PostgresConnectionError: _Meaning(DatabaseUnavailable, True, _LOST),
    asyncpg.InterfaceError: _Meaning(DatabaseUnavailable, True, _LOST),
    # The protocol lost track of the connection's state (e.g. the server hung up mid-exchange).
    asyncpg.exceptions.InternalClientError: _Meaning(DatabaseUnavailable, True, _LOST),
    OSError: _Meaning(DatabaseUnavailable, True, _LOST),
    asyncpg.exceptions.SerializationError: _Meaning(TransactionConflict, False),
    asyncpg.exceptions.DeadlockDetectedError: _Meaning(TransactionConflict, False),
    asyncpg.UniqueViolationError: _Meaning(UniqueViolation, False),
    asyncpg.PostgresError: _Meaning(QueryError, False),
}


def _meaning(exc: BaseException) -> _Meaning | None:
    for cls in type(exc).__mro__:
        meaning = _MEANINGS.get(cls)
        if meaning is not None:
            return meaning
    return None


def translate(exc: BaseException, *, connecting: bool = False) -> Exception | None:
    """The SPARC error that driver exception `exc` stands for; None if `exc` is not one.

    While `connecting` (opening a connection), every driver error means the server could not be
    reached or refused the connection: DatabaseUnavailable, with the driver's words.
    """
    meaning = _meaning(exc)
    if meaning is None:
        return None
    if connecting:
        return DatabaseUnavailable(str(exc) or type(exc).__name__)
    message = meaning.message.format(exc=exc)
    if issubclass(meaning.error, QueryError):
        return meaning.error(
            message,
            sqlstate=getattr(exc, "sqlstate", None),
            constraint=getattr(exc, "constraint_name", None),
        )
    return meaning.error(message)


def connection_lost(exc: BaseException) -> bool:
    """Whether the connection `exc` was raised on can no longer be trusted."""
    meaning = _meaning(exc)
    return meaning is not None and meaning.connection_lost


def is_closed(connection: Connection) -> bool:
    try:
        return bool(cast(Any, connection).is_closed())
    except asyncpg.InterfaceError:
        return True  # asyncpg already took back a connection that closed


def due_for_recycling(connection: Connection) -> bool:
    """Whether asyncpg's pool would close `connection` on release (it served max_queries)."""
    proxy: Any = connection
    try:
        return bool(proxy._con._protocol.queries_count >= proxy._holder._max_queries)
    except AttributeError:
        # Not laid out as the asyncpg we know: let its pool see every release and decide.
        return True


def pool_of(database: databases.Database) -> Pool | None:
    """The asyncpg pool a connected encode/databases Database owns (None once disconnected)."""
    # databases keeps it on its backend and offers no way to acquire with a timeout.
    return cast(Pool | None, database._backend._pool)


async def _keep_session(connection: Any) -> None:
    """asyncpg's per-release reset hook: SPARC resets a session itself, only when needed."""


class DriverDatabase:
    """The process's encode/databases `Database` (one asyncpg pool) and how it is opened."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int,
        max_size: int,
        connect_timeout: float,
        max_idle: float,
        statement_cache_size: int,
        server_settings: Mapping[str, str],
        on_connection_opened: Callable[[], None],
        on_connection_closed: Callable[[], None],
    ) -> None:
        async def connection_opened(connection: Any) -> None:
            on_connection_opened()
            connection.add_termination_listener(lambda _: on_connection_closed())

        dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
        self._database = databases.Database(
            dsn,
            # databases reads only host/user/password from the URL; handing asyncpg the whole
            # DSN as well keeps every libpq URL option (sslmode, several hosts, ...) working.
            dsn=dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=connect_timeout,
            max_inactive_connection_lifetime=max_idle,
            statement_cache_size=statement_cache_size,
            server_settings=dict(server_settings),
            init=connection_opened,
            # asyncpg resets every connection's session on release (RESET ALL and more, a round
            # trip per request); SPARC does that only when a statement may have changed it.
            reset=_keep_session,
        )

    async def connect(self) -> Pool:
        """Open the pool (its min_size connections); returns it."""
        await self._database.connect()
        pool = pool_of(self._database)
        if pool is None:
            raise RuntimeError("encode/databases connected but holds no asyncpg pool")
        return pool

    async def disconnect(self) -> None:
        """Close the pool, waiting for every connection to come back."""
        if self._database.is_connected:
            await self._database.disconnect()


def migration_engine_arguments(url: str, connect_timeout: float) -> tuple[URL, dict[str, Any]]:
    """The SQLAlchemy URL and asyncpg connect arguments alembic's engine runs migrations with."""
    for scheme in _POSTGRESQL_SCHEMES:
        if url.startswith(scheme):
            url = "postgresql+asyncpg://" + url[len(scheme) :]
            break
    else:
        raise ValueError("not a postgresql:// URL")
    # Behind PgBouncer (transaction mode) a server connection outlives our client connection:
    # prepared statements must have unique names and not be reused across transactions.
    engine_url = make_url(url).update_query_dict({"prepared_statement_cache_size": "0"})
    connect_args = {
        "timeout": connect_timeout,
        "statement_cache_size": 0,
        "prepared_statement_name_func": lambda: f"__sparc_migration_{uuid.uuid4().hex}__",
    }
    return engine_url, connect_args
