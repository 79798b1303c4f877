"""Retention: the purge of expired sessions, spent throttle rows and old audit events.

- What goes: sessions past `expires_at` or idle past SPARC_TOKEN_IDLE_TIMEOUT; throttle rows
  whose window has passed and whose lock (if any) ended more than a window ago; audit events
  older than SPARC_AUDIT_RETENTION; mailed tokens past their expiry; outbox rows sent or failed
  more than SENT_MAIL_RETENTION ago.
- How: table by table, in batches of at most MAX_BATCH_ROWS, each batch a short transaction of
  its own on one pooled connection, yielding to the event loop between batches.
- Who: one process of the deployment at a time. Every batch first takes a transaction-level
  advisory lock (it holds behind PgBouncer's transaction mode, where a session lock would not);
  a purge that finds it taken stops, and leaves the work to the process holding it.
- When: every SPARC_PURGE_INTERVAL in each `sparc serve` process (`purging_in_background`), and
  on demand with `sparc purge`. Rows deleted are reported to `PurgeEvents`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import anyio
import anyio.lowlevel

from sparc.database import DatabaseClient, DatabaseUnavailable
from sparc.settings import Settings

logger = logging.getLogger("sparc.retention")

# The most rows one batch deletes, so that no transaction of the purge holds many row locks.
MAX_BATCH_ROWS = 1000
# The advisory lock every batch takes first: eight ASCII bytes read as a bigint, a key no other
# code of the service uses.
PURGE_LOCK_KEY = int.from_bytes(b"sparcpur", "big")
# Sent and failed mail (an address, a kind, a time; never a token) is kept this long for an
# operator to look into, and at least the hour the reset-mail limits count back over.
SENT_MAIL_RETENTION = 7 * 86400.0
# The background purge's task name, as asyncio shows it.
PURGE_TASK_NAME = "sparc purge"


@dataclass(frozen=True, slots=True)
class _Rule:
    """Which rows of `table` have outlived their use: `outlived`, a condition on `:age`."""

    table: str
    key: str  # the primary key, by which a batch's rows are deleted
    outlived: str
    age: Callable[[Settings], float]

    @property
    def batch_sql(self) -> str:
        # SKIP LOCKED: a row a request is changing right now is left for the next round, so a
        # batch never waits on a request (nor a request on a batch longer than one batch).
        return f"""
            WITH doomed AS (
                SELECT {self.key} FROM {self.table} WHERE {self.outlived}
                LIMIT :batch_size FOR UPDATE SKIP LOCKED
            ), deleted AS (
                DELETE FROM {self.table} WHERE {self.key} IN (SELECT {self.key} FROM doomed)
                RETURNING 1
            )
            SELECT count(*) FROM deleted
            """


_RULES = (
    _Rule(
        "sessions",
        "id",
        # Exactly the sessions the bearer-token backend no longer accepts.
        "expires_at <= now() OR last_seen_at <= now() - CAST(:age AS interval)",
        lambda settings: settings.token_idle_timeout,
    ),
    _Rule(
        "login_throttles",
        "key",
        # Rows a new failure would start afresh (see LoginThrottle.record_failure): the window
        # has passed, and a full quiet window since the lock ended has forgiven its lockouts.
        # Until then a row's `lockouts` still doubles the next lock, so it is kept.
        "window_started_at < now() - CAST(:age AS interval)"
        " AND (locked_until IS NULL OR locked_until < now() - CAST(:age AS interval))",
        lambda settings: settings.login_window,
    ),
    _Rule(
        "auth_events",
        "id",
        "created_at < now() - CAST(:age AS interval)",
        lambda settings: settings.audit_retention,
    ),
    _Rule(
        "account_tokens",
        "token_hash",
        "expires_at <= now() - CAST(:age AS interval)",
        lambda settings: 0.0,  # an expired token is refused anyway
    ),
    _Rule(
        "mail_outbox",
        "id",
        "(sent_at IS NOT NULL OR failed_at IS NOT NULL)"
        " AND created_at < now() - CAST(:age AS interval)",
        lambda settings: SENT_MAIL_RETENTION,
    ),
)
PURGED_TABLES = tuple(rule.table for rule in _RULES)


class PurgeEvents:
    """Does nothing here: subclass it (as sparc.metrics.Metrics does) to record the purge."""

    def rows_purged(self, table: str, count: int) -> None: ...


@dataclass(frozen=True, slots=True)
class PurgeReport:
    """What one purge did."""

    deleted: dict[str, int]  # rows deleted, per table of PURGED_TABLES
    seconds: float
    # Another process held the purge lock, so this one stopped (before its first batch or
    # between two): that process purges the rest.
    lock_held_elsewhere: bool

    @property
    def total(self) -> int:
        return sum(self.deleted.values())

    def summary(self) -> str:
        tables = ", ".join(f"{table} {count}" for table, count in self.deleted.items())
        return f"deleted {self.total} rows in {self.seconds:.2f} s ({tables})"


async def purge(
    client: DatabaseClient,
    settings: Settings,
    *,
    events: PurgeEvents | None = None,
    batch_size: int = MAX_BATCH_ROWS,
) -> PurgeReport:
    """Delete every row that has outlived its use, table by table, `batch_size` rows a batch.

    Raises DatabaseUnavailable (or QueryError) when a batch fails; the batches before it stay
    deleted, the failed one is rolled back.
    """
    if not 1 <= batch_size <= MAX_BATCH_ROWS:
        raise ValueError(f"batch_size={batch_size} must be 1 to {MAX_BATCH_ROWS}")
    events = events or PurgeEvents()
    started = time.monotonic()
    deleted = dict.fromkeys(PURGED_TABLES, 0)
    lock_held_elsewhere = False
    for rule in _RULES:
        values = {"age": timedelta(seconds=rule.age(settings)), "batch_size": batch_size}
        count = batch_size
        while count == batch_size:  # a short batch found the last of the table's rows
            batch = await _delete_batch(client, rule, values)
            if batch is None:
                lock_held_elsewhere = True
                break
            count = batch
            deleted[rule.table] += count
            if count:
                events.rows_purged(rule.table, count)
            # Requests get the event loop, and other processes the lock, between batches.
            await anyio.lowlevel.checkpoint()
        if lock_held_elsewhere:
            break
    return PurgeReport(deleted, time.monotonic() - started, lock_held_elsewhere)


async def _delete_batch(
    client: DatabaseClient, rule: _Rule, values: dict[str, object]
) -> int | None:
    """One batch in a transaction of its own: rows deleted, or None if another process holds
    the purge lock."""
    async with client.transaction():
        # Transaction-level: COMMIT releases it, on whichever server connection PgBouncer gave.
        locked = await client.fetch_val(
            "SELECT pg_try_advisory_xact_lock(:key)", {"key": PURGE_LOCK_KEY}
        )
        if not locked:
            return None
        count: int = await client.fetch_val(rule.batch_sql, values)
        return count


async def purge_every(
    client: DatabaseClient, settings: Settings, events: PurgeEvents | None = None
) -> NoReturn:
    """Purge every SPARC_PURGE_INTERVAL, for ever: a failed round is logged, the next tries
    again."""
    interval = settings.purge_interval
    while True:
        await anyio.sleep(interval)
        try:
            report = await purge(client, settings, events=events)
        except DatabaseUnavailable as exc:
            logger.warning("purge failed, next try in %g s: %s", interval, exc)
        except Exception:
            # Retention must not end for the life of the process over one bad round.
            logger.exception("purge failed, next try in %g s", interval)
        else:
            if report.lock_held_elsewhere:
                logger.debug("another process is purging; %s", report.summary())
            elif report.total:
                logger.info("purge %s", report.summary())


@contextlib.asynccontextmanager
async def purging_in_background(
    client: DatabaseClient, settings: Settings, *, events: PurgeEvents | None = None
) -> AsyncIterator[None]:
    """Run `purge_every` while the block runs (the app's lifespan). At its end a round in
    flight is cancelled: its batch rolls back, and the block returns once it has."""
    async with anyio.create_task_group() as group:
        group.start_soon(purge_every, client, settings, events, name=PURGE_TASK_NAME)
        try:
            yield
        finally:
            group.cancel_scope.cancel()
