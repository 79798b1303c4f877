"""The advisory lock that lets one process at a time migrate a database, on every host."""

from __future__ import annotations

import asyncio
import logging
import time

from alembic.util import CommandError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

logger = logging.getLogger(__name__)

# Any fixed number works: the bytes of "sparcmig". Advisory locks belong to one database, so
# deployments on other databases of the same server never wait for each other.
MIGRATION_LOCK_KEY = int.from_bytes(b"sparcmig", "big")
# A waiting instance asks again this often; the lock's holder is never slowed by it.
POLL_INTERVAL = 0.1
_TRY_LOCK = text(f"SELECT pg_try_advisory_xact_lock({MIGRATION_LOCK_KEY})")


class MigrationLockTimeout(CommandError):
    """Another instance kept migrating for longer than SPARC_MIGRATION_LOCK_TIMEOUT.

    A CommandError, so that plain `alembic upgrade` reports it in one line too."""


async def take_migration_lock(connection: AsyncConnection, *, max_wait: float) -> None:
    """Take the lock in `connection`'s transaction, which releases it when it ends; wait up to
    `max_wait` seconds (SPARC_MIGRATION_LOCK_TIMEOUT) for an instance that holds it.

    Each attempt is an instant `pg_try_advisory_xact_lock`, rather than one blocking
    `pg_advisory_xact_lock` under `SET LOCAL lock_timeout`: a `statement_timeout` set on the
    role or PgBouncer's `query_timeout` cannot cut a long wait short with a misleading error,
    and the migration's own statements run under whatever `lock_timeout` the server has.
    """
    if await _try_lock(connection):
        return
    logger.info(
        "waiting for another instance's migration (up to SPARC_MIGRATION_LOCK_TIMEOUT=%gs)",
        max_wait,
    )
    started = time.monotonic()
    deadline = started + max_wait
    while True:
        await asyncio.sleep(max(0.0, min(POLL_INTERVAL, deadline - time.monotonic())))
        if await _try_lock(connection):
            logger.info("the other migration ended after %.1f s", time.monotonic() - started)
            return
        if time.monotonic() >= deadline:
            raise MigrationLockTimeout(
                f"another instance was still migrating after SPARC_MIGRATION_LOCK_TIMEOUT="
                f"{max_wait:g}s: raise the setting if migrations take longer"
            )


async def _try_lock(connection: AsyncConnection) -> bool:
    return bool((await connection.execute(_TRY_LOCK)).scalar_one())
