"""Every migration upgrades and downgrades cleanly, one revision at a time."""

from __future__ import annotations

import anyio.to_thread
import asyncpg
import pytest
from alembic.script import ScriptDirectory

from sparc.migrations import (
    SchemaPosition,
    alembic_config,
    downgrade,
    head_revision,
    schema_position,
    upgrade,
)
from tests.conftest import asyncpg_dsn

pytestmark = pytest.mark.anyio

TABLES_AFTER = {
    "0001": {"users", "sessions"},
    "0002": {"users", "sessions", "login_throttles", "auth_events"},
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
