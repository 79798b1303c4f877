"""The driver boundary: the only module that imports asyncpg or encode/databases.

encode/databases owns the process's asyncpg pool. Two of its gaps are closed elsewhere in the
package and need a reach past its public API, made here and nowhere else: it acquires without a
timeout (SPARC acquires from the asyncpg pool itself, see `pool_of`), and it cannot tell whether a
connection is due to be recycled (`due_for_recycling`). The rest of the package sees driver
objects only through the Protocols of `sparc.database.driver`.
"""

from __future__ import annotations

import enum
import logging
import re
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import asyncpg
import databases
from sqlalchemy.engine import URL

from sparc.database.driver import Connection, Pool
from sparc.database.errors import (
    DatabaseUnavailable,
    QueryError,
    StatementTimeout,
    TransactionConflict,
    UniqueViolation,
    WritesRefused,
)

_POSTGRESQL_SCHEMES = ("postgresql+asyncpg://", "postgresql://")
logger = logging.getLogger("sparc.database")


class Fate(enum.Enum):
    """What becomes of the connection a driver exception was raised on."""

    KEEP = "keep"  # it serves on
    # The request may finish on it, but it must not be reused: it is attached to a server that
    # refuses writes, and the pool's next connection may find the new primary.
    DISCARD = "discard"
    LOST = "lost"  # it cannot be trusted with another statement


@dataclass(frozen=True, slots=True)
class _Meaning:
    """What a driver exception means to SPARC."""

    error: type[Exception]
    fate: Fate
    # How the SPARC error reads; `{exc}` is the driver's message.
    message: str = "{exc}"


_KEEP, _DISCARD, _LOST = Fate.KEEP, Fate.DISCARD, Fate.LOST
_LOST_MESSAGE = "lost the connection to PostgreSQL: {exc}"
_UNAVAILABLE = DatabaseUnavailable

# Every driver exception SPARC knows, looked up along the exception's MRO (the most specific
# class wins), so a new asyncpg subclass finds its parent's meaning. Whatever the server cannot
# serve now (rather than a statement it refuses) is DatabaseUnavailable: retry later.
_MEANINGS: dict[type[BaseException], _Meaning] = {
    # statement_timeout or a cancel request (57014): the connection itself is fine.
    asyncpg.QueryCanceledError: _Meaning(
        StatementTimeout, _KEEP, "the database cancelled a statement: {exc}"
    ),
    # Class 57: server shutdown or crash (57P01, 57P02), not accepting connections yet (57P03):
    # the server ends the session.
    asyncpg.exceptions.OperatorInterventionError: _Meaning(_UNAVAILABLE, _LOST, _LOST_MESSAGE),
    asyncpg.PostgresConnectionError: _Meaning(_UNAVAILABLE, _LOST, _LOST_MESSAGE),  # class 08
    asyncpg.InterfaceError: _Meaning(_UNAVAILABLE, _LOST, _LOST_MESSAGE),
    # The protocol lost track of the connection's state (e.g. the server hung up mid-exchange).
    asyncpg.exceptions.InternalClientError: _Meaning(_UNAVAILABLE, _LOST, _LOST_MESSAGE),
    OSError: _Meaning(_UNAVAILABLE, _LOST, _LOST_MESSAGE),
    # 25006: a standby, or a primary turned read-only by a switchover.
    asyncpg.exceptions.ReadOnlySQLTransactionError: _Meaning(
        WritesRefused, _DISCARD, "the database refused a write, it is read-only: {exc}"
    ),
    # Class 53: disk full, out of memory, too many connections.
    asyncpg.exceptions.InsufficientResourcesError: _Meaning(
        _UNAVAILABLE, _KEEP, "PostgreSQL is out of resources: {exc}"
    ),
    # 55P03: NOWAIT or lock_timeout gave up on a lock another transaction holds.
    asyncpg.exceptions.LockNotAvailableError: _Meaning(
        _UNAVAILABLE, _KEEP, "a lock was not available in time: {exc}"
    ),
    asyncpg.exceptions.SerializationError: _Meaning(TransactionConflict, _KEEP),
    asyncpg.exceptions.DeadlockDetectedError: _Meaning(TransactionConflict, _KEEP),
    asyncpg.UniqueViolationError: _Meaning(UniqueViolation, _KEEP),
    asyncpg.PostgresError: _Meaning(QueryError, _KEEP),
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


def connection_fate(exc: BaseException) -> Fate:
    """What becomes of the connection `exc` was raised on (KEEP for what is not the driver's)."""
    meaning = _meaning(exc)
    return _KEEP if meaning is None else meaning.fate


def connection_lost(exc: BaseException) -> bool:
    """Whether the connection `exc` was raised on can no longer be trusted."""
    return connection_fate(exc) is _LOST


# PgBouncer's answer to a startup setting it does not pass on (SQLSTATE 08P01).
_UNSUPPORTED_STARTUP_PARAMETER = re.compile(r"unsupported startup parameter:\s*(\w+)")


def refused_startup_setting(exc: BaseException) -> str | None:
    """The startup setting the server refused (PgBouncer refuses statement_timeout and the
    like), or None."""
    match = _UNSUPPORTED_STARTUP_PARAMETER.search(str(exc))
    return match.group(1) if match and isinstance(exc, asyncpg.PostgresError) else None


def dead_peer_settings(timeout: float) -> dict[str, str]:
    """The server's side of dead-peer detection: keepalives and tcp_user_timeout per session,
    so a backend whose client vanished in a partition ends instead of lingering."""
    if not timeout:
        return {}
    idle, interval, count = _keepalive_figures(timeout)
    return {
        "tcp_keepalives_idle": str(idle),
        "tcp_keepalives_interval": str(interval),
        "tcp_keepalives_count": str(count),
        "tcp_user_timeout": str(round(timeout * 1000)),  # milliseconds
    }


def _keepalive_figures(timeout: float) -> tuple[int, int, int]:
    # The first probe after half the timeout, then three more a sixth apart: the peer is given
    # up `timeout` after it last answered. The kernel takes whole seconds, at least 1.
    return max(1, round(timeout / 2)), max(1, round(timeout / 6)), 3


def _watch_for_dead_peer(connection: Any, timeout: float) -> None:
    """TCP keepalives and TCP_USER_TIMEOUT on the client's socket (asyncpg sets neither)."""
    transport = connection._transport  # asyncpg keeps its transport private
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a Unix socket has no peer to lose
    idle, interval, count = _keepalive_figures(timeout)
    options = [(socket.SOL_SOCKET, "SO_KEEPALIVE", 1)]
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", count),
        # Data sent but unacknowledged this long (a statement to a partitioned server).
        ("TCP_USER_TIMEOUT", round(timeout * 1000)),
    ):
        options.append((socket.IPPROTO_TCP, name, value))
    for level, name, value in options:
        if not hasattr(socket, name):
            continue  # Linux has all of them; other platforms fewer
        try:
            sock.setsockopt(level, getattr(socket, name), value)
        except OSError as exc:
            # A kernel without the option must not cost every connection.
            logger.warning("could not set %s on a database connection: %s", name, exc)


def tcp_options(connection: Connection) -> dict[str, int]:
    """The dead-peer options set on `connection`'s socket (empty for a Unix socket)."""
    transport = cast(Any, connection)._con._transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return {}
    options = {"SO_KEEPALIVE": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)}
    for option in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT", "TCP_USER_TIMEOUT"):
        if hasattr(socket, option):
            options[option] = sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, option))
    return options


def is_closed(connection: Connection) -> bool:
    proxy: Any = connection
    try:
        return bool(proxy.is_closed())
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


def cut(connection: Connection) -> None:
    """Terminate `connection` at once, even one asyncpg has already taken back (it may be
    mid-release); one already closed is left alone."""
    raw: Any = connection
    if isinstance(connection, asyncpg.pool.PoolConnectionProxy):
        proxy: Any = connection
        raw = proxy._con if proxy._con is not None else proxy._holder._con
    if raw is not None and not raw.is_closed():
        raw.terminate()


def cancel_pending(connection: Connection) -> bool:
    """Whether a cancel request for `connection`'s last statement is still under way; the
    driver's pool would wait for it without bound on release."""
    proxy: Any = connection
    try:
        return bool(proxy._con._protocol._is_cancelling())
    except AttributeError:
        return False  # not laid out as the asyncpg we know: units confirm cancels themselves


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
        dead_peer_timeout: float,
        on_connection_opened: Callable[[], None],
        on_connection_closed: Callable[[], None],
    ) -> None:
        async def connection_opened(connection: Any) -> None:
            if dead_peer_timeout:
                _watch_for_dead_peer(connection, dead_peer_timeout)
            on_connection_opened()
            connection.add_termination_listener(lambda _: on_connection_closed())

        dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
        self._database = databases.Database(
            # databases would hand asyncpg the URL's host, port, user and password, which win
            # over the DSN and cannot express several hosts; given only the database name, it
            # hands none of them, and asyncpg reads them (hosts, sslmode, target_session_attrs
            # ...) from the whole DSN.
            "postgresql://" + urlsplit(dsn).path,
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
            dsn = "postgresql://" + url[len(scheme) :]
            break
    else:
        raise ValueError("not a postgresql:// URL")
    # SQLAlchemy's URL holds one host; asyncpg reads every host (and the rest) from the DSN, so
    # the engine's URL names only the database. Behind PgBouncer (transaction mode) a server
    # connection outlives our client connection: prepared statements must have unique names
    # and not be reused across transactions.
    engine_url = URL.create(
        "postgresql+asyncpg",
        database=urlsplit(dsn).path.lstrip("/"),
        query={"prepared_statement_cache_size": "0"},
    )
    connect_args = {
        "dsn": dsn,
        "timeout": connect_timeout,
        "statement_cache_size": 0,
        "prepared_statement_name_func": lambda: f"__sparc_migration_{uuid.uuid4().hex}__",
    }
    return engine_url, connect_args
