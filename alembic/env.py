"""Alembic environment: runs migrations over asyncpg with the URL from SPARC's settings."""

import asyncio
import contextlib
import uuid

from alembic import context
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from sparc.embedded import embedded_postgres
from sparc.migrations import sqlalchemy_url
from sparc.settings import load_settings


def run_on(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()


async def run_async(url: str, connect_timeout: float) -> None:
    # Behind PgBouncer (transaction mode) a server connection outlives our client connection:
    # prepared statements must have unique names and not be reused across transactions.
    engine_url = make_url(sqlalchemy_url(url)).update_query_dict(
        {"prepared_statement_cache_size": "0"}
    )
    engine = create_async_engine(
        engine_url,
        connect_args={
            "timeout": connect_timeout,
            "statement_cache_size": 0,
            "prepared_statement_name_func": lambda: f"__sparc_migration_{uuid.uuid4().hex}__",
        },
    )
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
