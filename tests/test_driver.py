"""The driver boundary: the reach into encode/databases, and the one translation table."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from sparc.database import (
    DatabaseUnavailable,
    QueryError,
    StatementTimeout,
    TransactionConflict,
    UniqueViolation,
    WritesRefused,
)
from sparc.database._asyncpg import (
    DriverDatabase,
    Fate,
    cancel_pending,
    connection_fate,
    cut,
    migration_engine_arguments,
    refused_startup_setting,
    translate,
)

KEEP, DISCARD, LOST = Fate.KEEP, Fate.DISCARD, Fate.LOST
exceptions = asyncpg.exceptions

pytestmark = pytest.mark.anyio


def driver_database(
    url: str, *, max_size: int, server_settings: dict[str, str] | None = None
) -> DriverDatabase:
    """The driver's Database on `url`, as the pool opens it, with no metrics attached."""
    return DriverDatabase(
        url,
        min_size=1,
        max_size=max_size,
        connect_timeout=5,
        max_idle=60,
        statement_cache_size=0,
        server_settings=server_settings or {},
        dead_peer_timeout=30,
        on_connection_opened=lambda: None,
        on_connection_closed=lambda: None,
    )


async def test_the_asyncpg_pool_is_found_inside_encode_databases(database_url: str) -> None:
    # Reads encode/databases' private backend: should a new release lay it out differently,
    # this fails here rather than every request failing later.
    database = driver_database(
        database_url, max_size=2, server_settings={"application_name": "sparc-driver-test"}
    )
    pool = await database.connect()
    try:
        assert isinstance(pool, asyncpg.Pool)
        assert (pool.get_min_size(), pool.get_max_size()) == (1, 2)
        connection = await pool.acquire()
        try:
            assert await connection.fetchval("SELECT current_setting('application_name')") == (
                "sparc-driver-test"
            )
        finally:
            await pool.release(connection, timeout=None)
    finally:
        await database.disconnect()


async def test_a_cancel_under_way_is_seen_on_the_connection(database_url: str) -> None:
    # Reads asyncpg's protocol state: should it be laid out differently, this fails here.
    database = driver_database(database_url, max_size=1)
    pool = await database.connect()
    try:
        connection = await pool.acquire()
        assert not cancel_pending(connection)
        sleeping = asyncio.ensure_future(connection.execute("SELECT pg_sleep(5)"))
        await asyncio.sleep(0.1)  # let the statement reach the server
        sleeping.cancel()
        await asyncio.gather(sleeping, return_exceptions=True)
        # asyncpg counts the cancel as under way until the connection's next use waits for
        # it; SPARC confirms such a connection with a statement of its own, or cuts it.
        assert cancel_pending(connection)
        cut(connection)
        await pool.release(connection, timeout=5)
    finally:
        await database.disconnect()


def postgres_error(cls: type[asyncpg.PostgresError], **fields: str) -> asyncpg.PostgresError:
    # Built the way asyncpg builds it from a server message: the class follows the SQLSTATE.
    return cls.new({"C": cls.sqlstate, "M": "boom", **fields})  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("driver_error", "error", "fate"),
    [
        (postgres_error(asyncpg.QueryCanceledError), StatementTimeout, KEEP),
        # Class 57: the server shut down, crashed, or does not take connections yet.
        (postgres_error(exceptions.AdminShutdownError), DatabaseUnavailable, LOST),
        (postgres_error(exceptions.CrashShutdownError), DatabaseUnavailable, LOST),
        (postgres_error(exceptions.CannotConnectNowError), DatabaseUnavailable, LOST),
        # Class 08 and the driver's own: the connection is gone.
        (postgres_error(exceptions.ConnectionDoesNotExistError), DatabaseUnavailable, LOST),
        (asyncpg.InterfaceError("closed"), DatabaseUnavailable, LOST),
        (ConnectionResetError("reset"), DatabaseUnavailable, LOST),
        # A read-only server: the request may finish its reads, the connection is not reused.
        (postgres_error(exceptions.ReadOnlySQLTransactionError), WritesRefused, DISCARD),
        # Class 53 (disk full, out of memory, too many connections) and lock_not_available.
        (postgres_error(exceptions.DiskFullError), DatabaseUnavailable, KEEP),
        (postgres_error(exceptions.OutOfMemoryError), DatabaseUnavailable, KEEP),
        (postgres_error(exceptions.TooManyConnectionsError), DatabaseUnavailable, KEEP),
        (postgres_error(exceptions.LockNotAvailableError), DatabaseUnavailable, KEEP),
        (postgres_error(exceptions.SerializationError), TransactionConflict, KEEP),
        (postgres_error(exceptions.DeadlockDetectedError), TransactionConflict, KEEP),
        (postgres_error(asyncpg.UniqueViolationError, n="users_email"), UniqueViolation, KEEP),
        (postgres_error(exceptions.UndefinedTableError), QueryError, KEEP),
    ],
)
def test_each_driver_error_has_one_meaning(
    driver_error: BaseException, error: type[Exception], fate: Fate
) -> None:
    translated = translate(driver_error)
    assert type(translated) is error
    assert connection_fate(driver_error) is fate
    if isinstance(translated, QueryError):
        assert translated.sqlstate == getattr(driver_error, "sqlstate", None)


def test_a_unique_violation_names_its_constraint() -> None:
    translated = translate(postgres_error(asyncpg.UniqueViolationError, n="users_email"))
    assert isinstance(translated, UniqueViolation)
    assert (translated.sqlstate, translated.constraint) == ("23505", "users_email")


def test_while_connecting_every_driver_error_means_unavailable() -> None:
    refused = postgres_error(asyncpg.exceptions.InvalidCatalogNameError)
    translated = translate(refused, connecting=True)
    assert type(translated) is DatabaseUnavailable
    assert "boom" in str(translated)


def test_what_is_not_the_drivers_is_left_alone() -> None:
    assert translate(ValueError("mine")) is None
    assert connection_fate(ValueError("mine")) is KEEP


def test_pgbouncers_refusal_of_a_startup_setting_is_recognised() -> None:
    refusal = asyncpg.exceptions.ProtocolViolationError.new(
        {"C": "08P01", "M": "unsupported startup parameter: statement_timeout"}
    )
    assert refused_startup_setting(refusal) == "statement_timeout"
    assert refused_startup_setting(postgres_error(exceptions.UndefinedTableError)) is None


def test_migrations_use_unique_statement_names_and_no_cache() -> None:
    url, connect_args = migration_engine_arguments("postgresql://u@h/db", 3.0)
    assert url.drivername == "postgresql+asyncpg"
    assert url.query["prepared_statement_cache_size"] == "0"
    assert connect_args["statement_cache_size"] == 0
    names = connect_args["prepared_statement_name_func"]
    assert names() != names()
