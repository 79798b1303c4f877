"""Every migration upgrades and downgrades cleanly, one revision at a time, and the whole chain
makes the round trip on a database with data in it."""

from __future__ import annotations

import anyio.to_thread
import asyncpg
import pytest
from alembic.script import ScriptDirectory

from sparc.app import create_app
from sparc.migrations import (
    SchemaPosition,
    alembic_config,
    downgrade,
    head_revision,
    schema_position,
    upgrade,
)
from sparc.settings import Settings
from tests.conftest import asyncpg_dsn, serving
from tests.helpers import bearer, login, token_for

pytestmark = pytest.mark.anyio

# 0003 and 0005 add columns and indexes, no table.
_AUTH_TABLES = {"users", "sessions", "login_throttles", "auth_events"}
_MAIL_TABLES = _AUTH_TABLES | {"mail_outbox", "account_tokens"}
TABLES_AFTER = {
    "0001": {"users", "sessions"},
    "0002": _AUTH_TABLES,
    "0003": _AUTH_TABLES,
    "0004": _MAIL_TABLES,
    "0005": _MAIL_TABLES,
}


async def tables(url: str) -> set[str]:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await connection.close()
    return {row["tablename"] for row in rows} - {"alembic_version"}


def revisions(url: str) -> list[str]:
    script = ScriptDirectory.from_config(alembic_config(url))
    return [revision.revision for revision in reversed(list(script.walk_revisions()))]


async def test_each_revision_upgrades_and_downgrades(database_url: str) -> None:
    # The fixture's database is at head; walk all the way down and back up, step by step.
    chain = revisions(database_url)
    assert chain == list(TABLES_AFTER)
    for revision in reversed(chain):
        assert await tables(database_url) == TABLES_AFTER[revision]
        await anyio.to_thread.run_sync(downgrade, database_url, "-1")
    assert await tables(database_url) == set()
    for revision in chain:
        await anyio.to_thread.run_sync(upgrade, database_url, revision)
        assert await tables(database_url) == TABLES_AFTER[revision]


async def test_upgrade_downgrade_upgrade_round_trip_with_data_in_every_table(
    settings: Settings, database_url: str, admin: asyncpg.Connection
) -> None:
    # Data of every kind the app writes, written by the app itself: users, sessions, throttle
    # rows (registrations and a failed login count), audit events.
    async with serving(create_app(settings), check_openapi=True) as http:
        token = await token_for(http, "ada@example.org")
        assert (await login(http, "ada@example.org", "wrong password")).status_code == 401
        assert (await http.get("/auth/me", headers=bearer(token))).status_code == 200
    # What only an admin or the CLI writes: roles, a disabled account, an event naming its actor.
    await admin.execute(
        "UPDATE users SET is_admin = true, disabled_at = now(),"
        " disabled_until = now() + interval '1 day'"
    )
    await admin.execute(
        "INSERT INTO auth_events (type, user_id, actor_id, via)"
        " SELECT 'admin_user_disabled', id, id, 'cli' FROM users"
    )
    for table in await tables(database_url):
        rows = await admin.fetchval(f'SELECT count(*) FROM "{table}"')
        assert rows > 0, f"fill {table} here too, so the round trip runs with data in it"
    for table, column in (
        ("users", "last_login_at"),
        ("users", "disabled_until"),
        ("auth_events", "actor_id"),
    ):
        filled = await admin.fetchval(f"SELECT count({column}) FROM {table}")
        assert filled > 0, f"fill {table}.{column} here too"

    await anyio.to_thread.run_sync(downgrade, database_url, "base")
    assert await tables(database_url) == set()
    await anyio.to_thread.run_sync(upgrade, database_url, "head")
    assert await tables(database_url) == TABLES_AFTER[head_revision()]
    assert await admin.fetchval("SELECT version_num FROM alembic_version") == head_revision()

    # The schema built again serves the app as before.
    async with serving(create_app(settings), check_openapi=True) as http:
        token = await token_for(http, "ada@example.org")
        assert (await http.get("/auth/me", headers=bearer(token))).status_code == 200


@pytest.mark.parametrize(
    ("revision", "position"),
    [
        (None, SchemaPosition.BEHIND),  # never migrated, or downgraded to base
        ("0001", SchemaPosition.BEHIND),
        (head_revision(), SchemaPosition.AT_HEAD),
        ("a_revision_of_a_newer_release", SchemaPosition.AHEAD),
    ],
)
def test_a_schema_stands_behind_at_or_ahead_of_the_code(
    revision: str | None, position: SchemaPosition
) -> None:
    assert schema_position(revision) is position
