"""Alembic environment: runs migrations over asyncpg with the URL from SPARC's settings."""

import asyncio
import contextlib

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from sparc.embedded import embedded_postgres
from sparc.migrations import sqlalchemy_url
from sparc.settings import load_settings


def run_on(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()


async def run_async(url: str, connect_timeout: float) -> None:
    engine = create_async_engine(sqlalchemy_url(url), connect_args={"timeout": connect_timeout})
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_on)
            await connection.commit()
    finally:
        await engine.dispose()


def main() -> None:
    # `sparc migrate` hands its URL over; plain `alembic` reads the settings itself.
    url = context.config.attributes.get("database_url")
    settings = load_settings()
    with contextlib.ExitStack() as stack:
        if url is None:
            url = settings.database_url or stack.enter_context(embedded_postgres(settings.data_dir))
        asyncio.run(run_async(url, settings.connect_timeout))


if context.is_offline_mode():
    raise SystemExit("SPARC's migrations run online only: drop --sql")
main()
