"""Instances that start together migrate one at a time: real processes, one fresh database.

Before the lock, four `sparc migrate` started at once on a fresh database raced to create
alembic_version, and the losers exited 1 (`duplicate key value violates unique constraint
"pg_type_typname_nsp_index"`).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio.to_thread
import asyncpg
import pytest

from sparc.migration_lock import MIGRATION_LOCK_KEY
from sparc.migrations import head_revision
from tests.conftest import REPO_ROOT, asyncpg_dsn, poll_until_async
from tests.pgbouncer import running_pgbouncer
from tests.processes import free_port, run_sparc, sparc_env, start_sparc

pytestmark = pytest.mark.anyio

INSTANCES = 4
WAITING = "waiting for another instance's migration (up to SPARC_MIGRATION_LOCK_TIMEOUT="


@pytest.fixture(params=["direct", pytest.param("pgbouncer", marks=pytest.mark.faults)])
def migrate_env(
    request: pytest.FixtureRequest, server_url: str, cli_database: str
) -> Iterator[dict[str, str]]:
    """The environment of a `sparc migrate` of the fresh database, straight or through a
    PgBouncer in transaction mode (where only a transaction-level lock holds)."""
    if request.param == "direct":
        yield sparc_env(DATABASE_URL=cli_database)
        return
    with running_pgbouncer(server_url, pool_size=INSTANCES + 1) as bouncer:
        yield sparc_env(DATABASE_URL=bouncer.url_for(cli_database), DB_PGBOUNCER="true")


async def test_instances_started_at_once_on_a_fresh_database_all_reach_head(
    migrate_env: dict[str, str], cli_database: str, tmp_path: Path
) -> None:
    processes = [start_sparc("migrate", env=migrate_env, cwd=tmp_path) for _ in range(INSTANCES)]
    results = await finished(processes)
    assert [code for code, _ in results] == [0] * INSTANCES, results
    assert await schema_revision(cli_database) == head_revision()
    # One ran the migrations; the others found the schema at head once it was their turn.
    assert sum("Running upgrade" in stderr for _, stderr in results) == 1, results


async def test_instances_wait_for_a_migration_in_progress_then_find_the_schema_at_head(
    migrate_env: dict[str, str], cli_database: str, tmp_path: Path
) -> None:
    async with holding_the_migration_lock(cli_database):
        processes = [
            start_sparc("migrate", env=migrate_env, cwd=tmp_path) for _ in range(INSTANCES)
        ]
        await poll_until_async(lambda: all_waiting(cli_database, processes), within=60, every=0.1)
    results = await finished(processes)
    assert [code for code, _ in results] == [0] * INSTANCES, results
    assert all(f"{WAITING}300s)" in stderr for _, stderr in results), results
    assert await schema_revision(cli_database) == head_revision()
    assert sum("Running upgrade" in stderr for _, stderr in results) == 1, results


@pytest.mark.parametrize("command", ["sparc migrate", "sparc serve", "alembic upgrade head"])
async def test_a_wait_past_the_lock_timeout_stops_with_one_line_naming_the_setting(
    command: str, cli_database: str, tmp_path: Path
) -> None:
    env = sparc_env(DATABASE_URL=cli_database, SPARC_MIGRATION_LOCK_TIMEOUT="1s")
    async with holding_the_migration_lock(cli_database):
        result = await anyio.to_thread.run_sync(run, command, env, tmp_path)
    assert result.returncode != 0
    assert f"{WAITING}1s)" in result.stderr
    assert "Traceback" not in result.stderr
    if command == "alembic upgrade head":
        failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED:")]
    else:
        assert result.returncode == 1
        failed = [line for line in result.stderr.splitlines() if line.startswith("sparc:")]
    assert len(failed) == 1, result.stderr + result.stdout
    assert "still migrating after SPARC_MIGRATION_LOCK_TIMEOUT=1s" in failed[0]
    assert await schema_revision(cli_database) is None  # nothing was migrated meanwhile


def run(command: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    if command == "sparc migrate":
        return run_sparc("migrate", env=env, cwd=cwd)
    if command == "sparc serve":
        return run_sparc("serve", "--port", str(free_port()), env=env, cwd=cwd)
    return subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@contextlib.asynccontextmanager
async def holding_the_migration_lock(url: str) -> AsyncIterator[None]:
    """Hold the lock as a migrating instance would, in an open transaction, for the block."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            yield
    finally:
        await connection.close()


async def all_waiting(url: str, processes: list[subprocess.Popen[str]]) -> bool:
    """Whether every process has asked for the lock and is waiting its turn."""
    exited = [process.args for process in processes if process.poll() is not None]
    assert not exited, f"exited while the lock was held: {exited}"
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        asking: int = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND query LIKE 'SELECT pg_try_advisory_xact_lock%'"
        )
    finally:
        await connection.close()
    return asking == len(processes)


async def finished(processes: list[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    """Each process's exit code and stderr, once it has exited."""
    results = []
    for process in processes:
        _, stderr = await anyio.to_thread.run_sync(process.communicate, None, 120)
        results.append((process.returncode, stderr))
    return results


async def schema_revision(url: str) -> str | None:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        if await connection.fetchval("SELECT to_regclass('alembic_version')") is None:
            return None
        revision: str | None = await connection.fetchval("SELECT version_num FROM alembic_version")
        return revision
    finally:
        await connection.close()
