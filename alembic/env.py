"""Alembic environment: runs migrations over asyncpg with the URL from SPARC's settings."""

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from sparc.database import migration_engine_arguments
from sparc.embedded import database_settings
from sparc.migration_lock import take_migration_lock
from sparc.settings import Settings, load_settings


def run_on(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None)
    # The connection is already in run_async's transaction: every revision runs in it.
    with context.begin_transaction():
        context.run_migrations()


async def run_async(settings: Settings) -> None:
    assert settings.database_url is not None
    engine_url, connect_args = migration_engine_arguments(
        settings.database_url, settings.connect_timeout
    )
    # READ COMMITTED whatever the server's default: once the lock is ours, alembic's next
    # statement must see what the instance that held it committed.
    engine = create_async_engine(
        engine_url, connect_args=connect_args, isolation_level="READ COMMITTED"
    )
    try:
        async with engine.connect() as connection, connection.begin():
            # First thing in the migration's own transaction (so it holds behind PgBouncer in
            # transaction mode too), before alembic reads or creates alembic_version.
            await take_migration_lock(connection, max_wait=settings.migration_lock_timeout)
            await connection.run_sync(run_on)
    finally:
        await engine.dispose()


def main() -> None:
    # `sparc migrate` hands its URL over; plain `alembic` reads the settings itself.
    settings = load_settings()
    url = context.config.attributes.get("database_url")
    if url is not None:
        settings = settings.with_database_url(url)
    with database_settings(settings) as resolved:
        asyncio.run(run_async(resolved))


if context.is_offline_mode():
    raise SystemExit("SPARC's migrations run online only: drop --sql")
# Plain `alembic` logs as alembic.ini says; `sparc` and the tests have set up logging already.
if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name, disable_existing_loggers=False)
main()
