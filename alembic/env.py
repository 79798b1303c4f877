"""Alembic environment: runs migrations over asyncpg with the URL from SPARC's settings."""

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from sparc.database import migration_engine_arguments
from sparc.embedded import database_settings
from sparc.settings import load_settings


def run_on(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()


async def run_async(url: str, connect_timeout: float) -> None:
    engine_url, connect_args = migration_engine_arguments(url, connect_timeout)
    engine = create_async_engine(engine_url, connect_args=connect_args)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_on)
            await connection.commit()
    finally:
        await engine.dispose()


def main() -> None:
    # `sparc migrate` hands its URL over; plain `alembic` reads the settings itself.
    settings = load_settings()
    url = context.config.attributes.get("database_url")
    if url is not None:
        settings = settings.with_database_url(url)
    with database_settings(settings) as resolved:
        assert resolved.database_url is not None
        asyncio.run(run_async(resolved.database_url, resolved.connect_timeout))


if context.is_offline_mode():
    raise SystemExit("SPARC's migrations run online only: drop --sql")
main()
