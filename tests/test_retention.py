"""Retention: what the purge deletes and keeps, its batches and lock, `sparc purge`, the loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest

from sparc.app import create_app
from sparc.database import DatabaseClient, PoolEvents, bind_db_client
from sparc.retention import (
    MAX_BATCH_ROWS,
    PURGE_LOCK_KEY,
    PURGE_TASK_NAME,
    SENT_MAIL_RETENTION,
    PurgeEvents,
    PurgeReport,
    purge,
)
from sparc.security import hash_token
from sparc.settings import Settings
from sparc.throttle import LoginThrottle, account_key, login_key
from tests.conftest import connection_to, poll_until, poll_until_async, serving
from tests.helpers import bearer, token_for
from tests.pgbouncer import running_pgbouncer
from tests.processes import run_sparc, sparc_env
from tests.test_metrics import scrape, value

pytestmark = pytest.mark.anyio

WINDOW = 900.0
IDLE_TIMEOUT = 1800.0
RETENTION = 30 * 86400.0
SPRAY = 10_000


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        login_window=WINDOW,
        token_idle_timeout=IDLE_TIMEOUT,
        audit_retention=RETENTION,
    )


class BatchesSeen(PurgeEvents):
    def __init__(self) -> None:
        self.batches: list[tuple[str, int]] = []

    def rows_purged(self, table: str, count: int) -> None:
        self.batches.append((table, count))


class TransactionsSeen(PoolEvents):
    def __init__(self) -> None:
        self.committed = 0

    def transaction_finished(self, *, committed: bool) -> None:
        self.committed += committed


async def purge_now(
    settings: Settings, *, events: PurgeEvents | None = None, batch_size: int = MAX_BATCH_ROWS
) -> PurgeReport:
    async with DatabaseClient(settings) as client:
        return await purge(client, settings, events=events, batch_size=batch_size)


async def throttle_rows(admin: asyncpg.Connection) -> set[str]:
    return {row["key"] for row in await admin.fetch("SELECT key FROM login_throttles")}


async def insert_throttle_rows(
    admin: asyncpg.Connection,
    keys: list[str],
    *,
    window_started_ago: float = 0.0,
    locked_until_in: float | None = None,
    lockouts: int = 0,
) -> None:
    """Rows shaped like LoginThrottle's: a first failure, or a lock (failures back at 0)."""
    await admin.execute(
        """
        INSERT INTO login_throttles (key, failures, window_started_at, lockouts, locked_until)
        SELECT key, $2, now() - $3 * interval '1 s', $4, now() + $5 * interval '1 s'
        FROM unnest($1::text[]) AS key
        """,
        keys,
        1 if locked_until_in is None else 0,
        window_started_ago,
        lockouts,
        locked_until_in,
    )


def spent_keys(count: int) -> list[str]:
    return [account_key(f"spent-{n}@example.org") for n in range(count)]


@pytest.fixture
async def second_admin(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """Another connection outside SPARC's pool, to hold locks while `admin` looks on."""
    async with connection_to(database_url) as connection:
        yield connection


async def purge_lock_holders(admin: asyncpg.Connection) -> int:
    count: int = await admin.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND (classid::bigint << 32 | objid::bigint) = $1",
        PURGE_LOCK_KEY,
    )
    return count


async def test_a_spray_of_unknown_emails_leaves_no_throttle_rows_once_the_window_passed(
    settings: Settings, admin: asyncpg.Connection
) -> None:
    throttle = LoginThrottle(max_failures=5, ip_max_failures=50, window=WINDOW)
    async with DatabaseClient(settings) as client:
        with bind_db_client(client):
            for _ in range(5):
                async with client.transaction():
                    await throttle.record_failure("victim@example.org", None)
    spray = [account_key(f"spray-{n}@unknown.example") for n in range(SPRAY)]
    await insert_throttle_rows(admin, spray)

    # While their window is open the spray's rows count failures: all are kept.
    assert (await purge_now(settings)).deleted["login_throttles"] == 0
    await admin.execute(
        "UPDATE login_throttles SET window_started_at = now() - $1 * interval '1 s'"
        " WHERE key = ANY($2)",
        WINDOW + 1,
        spray,
    )
    batches = BatchesSeen()
    report = await purge_now(settings, events=batches)

    assert report.deleted["login_throttles"] == SPRAY
    # The live lockout (per email and address) and its account's open window survive.
    assert await throttle_rows(admin) == {
        login_key("victim@example.org", None),
        account_key("victim@example.org"),
    }
    assert batches.batches == [("login_throttles", MAX_BATCH_ROWS)] * (SPRAY // MAX_BATCH_ROWS)
    async with DatabaseClient(settings) as client:
        with bind_db_client(client):
            assert await throttle.retry_after("victim@example.org", None) is not None


@pytest.mark.parametrize(
    ("window_started_ago", "locked_until_in", "kept"),
    [
        pytest.param(60.0, None, True, id="window-open"),
        pytest.param(WINDOW + 1, None, False, id="window-passed"),
        pytest.param(60.0, WINDOW - 60, True, id="locked"),
        # The lock ended a second ago: its lockouts still double the next lock.
        pytest.param(WINDOW + 1, -1.0, True, id="lock-ended-within-a-window"),
        pytest.param(2 * WINDOW + 1, -(WINDOW + 1), False, id="lock-ended-a-window-ago"),
        # A second lockout (two windows long) that ended less than a window ago.
        pytest.param(2 * WINDOW + 60, -60.0, True, id="doubled-lock-ended-within-a-window"),
    ],
)
async def test_a_throttle_row_is_kept_while_its_window_or_lockouts_still_count(
    settings: Settings,
    admin: asyncpg.Connection,
    window_started_ago: float,
    locked_until_in: float | None,
    kept: bool,
) -> None:
    key = account_key("someone@example.org")
    await insert_throttle_rows(
        admin,
        [key],
        window_started_ago=window_started_ago,
        locked_until_in=locked_until_in,
        lockouts=0 if locked_until_in is None else 1,
    )
    await purge_now(settings)
    assert await throttle_rows(admin) == ({key} if kept else set())


async def session_id(admin: asyncpg.Connection, token: str) -> object:
    return await admin.fetchval("SELECT id FROM sessions WHERE token_hash = $1", hash_token(token))


async def test_expired_and_idle_sessions_are_purged_and_live_ones_kept(
    settings: Settings, admin: asyncpg.Connection
) -> None:
    async with serving(create_app(settings)) as http:
        expired, idle, live = [await token_for(http, "sessions@example.org") for _ in range(3)]
        await admin.execute(
            "UPDATE sessions SET expires_at = now() - interval '1 s' WHERE id = $1",
            await session_id(admin, expired),
        )
        await admin.execute(
            "UPDATE sessions SET last_seen_at = now() - $2 * interval '1 s' WHERE id = $1",
            await session_id(admin, idle),
            IDLE_TIMEOUT + 1,
        )
        report = await purge_now(settings)
        assert report.deleted["sessions"] == 2
        assert [row["id"] for row in await admin.fetch("SELECT id FROM sessions")] == [
            await session_id(admin, live)
        ]
        assert (await http.get("/auth/me", headers=bearer(live))).status_code == 200


async def test_audit_events_older_than_the_retention_are_purged(
    settings: Settings, admin: asyncpg.Connection
) -> None:
    ages = {"a day past": RETENTION + 86400, "a second past": RETENTION + 1}
    ages |= {"a day short": RETENTION - 86400, "new": 0.0}
    for label, age in ages.items():
        await admin.execute(
            "INSERT INTO auth_events (type, user_agent, created_at)"
            " VALUES ('login_failed', $1, now() - $2 * interval '1 s')",
            label,
            age,
        )
    report = await purge_now(settings)
    assert report.deleted["auth_events"] == 2
    kept = {row["user_agent"] for row in await admin.fetch("SELECT user_agent FROM auth_events")}
    assert kept == {"a day short", "new"}


async def test_expired_tokens_and_mail_sent_or_failed_a_week_ago_are_purged(
    settings: Settings, admin: asyncpg.Connection
) -> None:
    user_id = await admin.fetchval(
        "INSERT INTO users (email, password_hash) VALUES ('mailed@example.org', 'x') RETURNING id"
    )
    await admin.executemany(
        "INSERT INTO account_tokens (token_hash, user_id, purpose, expires_at)"
        " VALUES ($1, $2, 'password_reset', now() + $3 * interval '1 s')",
        [(b"expired", user_id, -1.0), (b"live", user_id, 3600.0)],
    )
    week = SENT_MAIL_RETENTION
    rows = [  # (label, created this long ago, sent, failed)
        ("sent long ago", week + 60, True, False),
        ("failed long ago", week + 60, False, True),
        ("sent lately", week - 3600, True, False),
        ("pending long", week + 60, False, False),  # still to deliver: never purged
    ]
    await admin.executemany(
        "INSERT INTO mail_outbox (user_id, kind, recipient, created_at, sent_at, failed_at)"
        " VALUES ($1, 'password_changed', $2, now() - $3 * interval '1 s',"
        " CASE WHEN $4 THEN now() END, CASE WHEN $5 THEN now() END)",
        [(user_id, *row) for row in rows],
    )
    report = await purge_now(settings)
    assert (report.deleted["account_tokens"], report.deleted["mail_outbox"]) == (1, 2)
    assert await admin.fetchval("SELECT token_hash FROM account_tokens") == b"live"
    kept = {row["recipient"] for row in await admin.fetch("SELECT recipient FROM mail_outbox")}
    assert kept == {"sent lately", "pending long"}


async def test_the_purge_deletes_in_batches_each_its_own_transaction(
    database_url: str, admin: asyncpg.Connection
) -> None:
    settings = Settings(database_url=database_url)
    await insert_throttle_rows(admin, spent_keys(250), window_started_ago=settings.login_window + 1)
    batches, transactions = BatchesSeen(), TransactionsSeen()
    async with DatabaseClient(settings, events=transactions) as client:
        report = await purge(client, settings, events=batches, batch_size=100)
    assert report.deleted == {
        "sessions": 0,
        "login_throttles": 250,
        "auth_events": 0,
        "account_tokens": 0,
        "mail_outbox": 0,
    }
    assert batches.batches == [("login_throttles", 100)] * 2 + [("login_throttles", 50)]
    # One per batch, and one per table that found nothing.
    assert transactions.committed == 7


async def test_the_purge_needs_only_one_pooled_connection(
    database_url: str, admin: asyncpg.Connection
) -> None:
    settings = Settings(database_url=database_url, pool_max_size=1, pool_timeout=1)
    await insert_throttle_rows(admin, spent_keys(25), window_started_ago=settings.login_window + 1)
    report = await purge_now(settings, batch_size=10)
    assert report.deleted["login_throttles"] == 25


@pytest.mark.parametrize("batch_size", [0, MAX_BATCH_ROWS + 1])
async def test_batches_are_at_most_a_thousand_rows(settings: Settings, batch_size: int) -> None:
    with pytest.raises(ValueError, match=f"batch_size={batch_size} must be 1 to 1000"):
        await purge_now(settings, batch_size=batch_size)


async def test_a_row_a_request_holds_is_left_for_the_next_round(
    settings: Settings, admin: asyncpg.Connection, second_admin: asyncpg.Connection
) -> None:
    held, *others = spent_keys(3)
    await insert_throttle_rows(admin, [held, *others], window_started_ago=WINDOW + 1)
    async with second_admin.transaction():
        await second_admin.execute("SELECT 1 FROM login_throttles WHERE key = $1 FOR UPDATE", held)
        report = await purge_now(settings)  # no waiting on the held row
        assert report.deleted["login_throttles"] == 2
    assert await throttle_rows(admin) == {held}
    assert (await purge_now(settings)).deleted["login_throttles"] == 1


@pytest.mark.faults
async def test_behind_pgbouncer_each_batch_takes_and_frees_the_lock(
    server_url: str, database_url: str, admin: asyncpg.Connection
) -> None:
    # PgBouncer gives each transaction whichever server connection is free: the purge lock
    # must live and die with a batch's transaction, leaving nothing on the server connection.
    await insert_throttle_rows(admin, spent_keys(50), window_started_ago=WINDOW + 1)
    with running_pgbouncer(server_url, pool_size=2) as bouncer:
        settings = Settings(
            database_url=bouncer.url_for(database_url), pgbouncer=True, statement_cache_size=0
        )
        reports = []
        for _ in range(3):
            async with DatabaseClient(settings) as client:
                reports.append(await purge(client, settings, batch_size=10))
            await insert_throttle_rows(admin, spent_keys(5), window_started_ago=WINDOW + 1)
    assert [(r.lock_held_elsewhere, r.deleted["login_throttles"]) for r in reports] == [
        (False, 50),
        (False, 5),
        (False, 5),
    ]
    assert await purge_lock_holders(admin) == 0


async def test_a_purge_that_finds_the_lock_taken_skips_the_round(
    settings: Settings, admin: asyncpg.Connection, second_admin: asyncpg.Connection
) -> None:
    await insert_throttle_rows(admin, spent_keys(3), window_started_ago=WINDOW + 1)
    async with second_admin.transaction():
        await second_admin.execute("SELECT pg_advisory_xact_lock($1)", PURGE_LOCK_KEY)
        skipped = await purge_now(settings)
    assert skipped.lock_held_elsewhere
    assert skipped.total == 0
    assert len(await throttle_rows(admin)) == 3
    done = await purge_now(settings)
    assert (done.lock_held_elsewhere, done.total) == (False, 3)


async def test_two_purges_started_at_once_do_not_work_at_the_same_time(
    settings: Settings, admin: asyncpg.Connection, second_admin: asyncpg.Connection
) -> None:
    await insert_throttle_rows(admin, spent_keys(30), window_started_ago=WINDOW + 1)
    reports: list[PurgeReport] = []
    async with DatabaseClient(settings) as first, DatabaseClient(settings) as second:

        async def run(client: DatabaseClient) -> None:
            reports.append(await purge(client, settings, batch_size=10))

        # Whichever purge takes the lock first waits in its first batch on this table lock,
        # holding the purge lock, so the other must find it taken.
        transaction = second_admin.transaction()
        await transaction.start()
        await second_admin.execute("LOCK TABLE sessions IN SHARE MODE")
        async with anyio.create_task_group() as group:
            group.start_soon(run, first)
            group.start_soon(run, second)
            await poll_until(lambda: len(reports) == 1)
            assert await purge_lock_holders(admin) == 1
            assert (reports[0].lock_held_elsewhere, reports[0].total) == (True, 0)
            await transaction.rollback()
    assert (reports[1].lock_held_elsewhere, reports[1].total) == (False, 30)
    assert await throttle_rows(admin) == set()


async def insert_one_of_each_stale_row(admin: asyncpg.Connection) -> None:
    """An idle session, two spent throttle rows and an event past SPARC_AUDIT_RETENTION."""
    user_id = await admin.fetchval(
        "INSERT INTO users (email, password_hash) VALUES ('stale@example.org', 'x') RETURNING id"
    )
    await admin.execute(
        "INSERT INTO sessions (user_id, token_hash, expires_at, last_seen_at)"
        " VALUES ($1, '\\x00', now() + interval '1 h', now() - interval '1 d')",
        user_id,
    )
    await insert_throttle_rows(admin, spent_keys(2), window_started_ago=86400)
    await admin.execute(
        "INSERT INTO auth_events (type, created_at) VALUES ('register', now() - interval '400 d')"
    )


async def stale_rows(admin: asyncpg.Connection) -> int:
    count: int = await admin.fetchval(
        "SELECT (SELECT count(*) FROM sessions) + (SELECT count(*) FROM login_throttles)"
        " + (SELECT count(*) FROM auth_events)"
    )
    return count


def test_sparc_purge_prints_the_rows_deleted_per_table(cli_database: str) -> None:
    env = sparc_env(DATABASE_URL=cli_database)
    assert run_sparc("migrate", env=env).returncode == 0

    async def prepare() -> None:
        async with connection_to(cli_database) as connection:
            await insert_one_of_each_stale_row(connection)

    anyio.run(prepare)
    result = run_sparc("purge", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "sessions: 1 row deleted",
        "login_throttles: 2 rows deleted",
        "auth_events: 1 row deleted",
        "account_tokens: 0 rows deleted",
        "mail_outbox: 0 rows deleted",
    ]
    again = run_sparc("purge", env=env)
    assert again.stdout.splitlines()[1] == "login_throttles: 0 rows deleted"


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("postgresql://sparc:hunter2@127.0.0.1:9/sparc", "cannot reach PostgreSQL at 127.0.0.1:9"),
        (None, 'purge failed: relation "sessions" does not exist'),
    ],
    ids=["unreachable", "not-migrated"],
)
def test_sparc_purge_fails_on_a_database_error_with_one_line(
    cli_database: str, url: str | None, complaint: str
) -> None:
    env = sparc_env(DATABASE_URL=url or cli_database, DB_CONNECT_TIMEOUT="1")
    result = run_sparc("purge", env=env, timeout=60)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("sparc:")]
    assert len(errors) == 1 and complaint in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def purge_tasks() -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks() if task.get_name() == PURGE_TASK_NAME]


async def test_the_app_purges_in_the_background_and_stops_at_shutdown(
    database_url: str, admin: asyncpg.Connection
) -> None:
    settings = Settings(database_url=database_url, purge_interval=0.05)
    async with serving(create_app(settings)):
        assert len(purge_tasks()) == 1
        await insert_one_of_each_stale_row(admin)
        await poll_until_async(lambda: stale_rows_are(admin, 0))
        # It goes on purging, round after round.
        await insert_throttle_rows(admin, spent_keys(1), window_started_ago=86400)
        await poll_until_async(lambda: stale_rows_are(admin, 0))
    assert purge_tasks() == []


async def stale_rows_are(admin: asyncpg.Connection, count: int) -> bool:
    return await stale_rows(admin) == count


async def test_the_metric_counts_purged_rows_per_table(
    database_url: str, admin: asyncpg.Connection
) -> None:
    settings = Settings(database_url=database_url, purge_interval=0.05)
    await insert_one_of_each_stale_row(admin)
    expected = {"sessions": 1, "login_throttles": 2, "auth_events": 1}
    async with serving(create_app(settings)) as http:

        async def all_counted() -> bool:
            samples = await scrape(http)
            purged = {t: value(samples, "sparc_purged_rows_total", table=t) for t in expected}
            return purged == expected

        await poll_until_async(all_counted)


async def test_a_failed_round_is_logged_and_the_next_one_tries_again(
    database_url: str,
    admin: asyncpg.Connection,
    second_admin: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(database_url=database_url, purge_interval=0.05, statement_timeout=0.2)
    await insert_one_of_each_stale_row(admin)
    caplog.set_level(logging.WARNING, logger="sparc.retention")
    async with serving(create_app(settings)):
        transaction = second_admin.transaction()
        await transaction.start()
        await second_admin.execute("LOCK TABLE sessions IN SHARE MODE")
        # Each round's first batch waits on the table lock until DB_STATEMENT_TIMEOUT.
        await poll_until(lambda: len(failures(caplog)) >= 2)
        assert await stale_rows(admin) == 4
        await transaction.rollback()
        await poll_until_async(lambda: stale_rows_are(admin, 0))
    assert "purge failed, next try in 0.05 s: " in failures(caplog)[0]


def failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("purge failed")]


async def test_shutdown_during_a_batch_ends_its_transaction_and_the_lock(
    database_url: str, admin: asyncpg.Connection, second_admin: asyncpg.Connection
) -> None:
    settings = Settings(database_url=database_url, purge_interval=0.05)
    await insert_one_of_each_stale_row(admin)
    transaction = second_admin.transaction()
    await transaction.start()
    await second_admin.execute("LOCK TABLE sessions IN SHARE MODE")
    try:
        async with serving(create_app(settings)):
            await poll_until_async(lambda: purge_lock_held(admin))
        assert purge_tasks() == []
        await poll_until_async(lambda: purge_lock_free(admin))
    finally:
        await transaction.rollback()
    assert await stale_rows(admin) == 4


async def purge_lock_held(admin: asyncpg.Connection) -> bool:
    return await purge_lock_holders(admin) == 1


async def purge_lock_free(admin: asyncpg.Connection) -> bool:
    return await purge_lock_holders(admin) == 0
