"""A database that refuses writes, a switchover, a lock not to be had: 503, never 500.

The tests own their PostgreSQL servers (listening on TCP) and turn them read-only with
ALTER SYSTEM, the way a switchover leaves an old primary: open sessions refuse writes too.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sparc.app import create_app
from sparc.database import get_db_client
from sparc.settings import Settings
from tests.conftest import connection_to, poll_until, serving
from tests.dbapp import tiny_app
from tests.helpers import PASSWORD, assert_problem, bearer, login, register, token_for
from tests.processes import run_sparc, sparc_env
from tests.tcp_postgres import TcpPostgres, running

pytestmark = [pytest.mark.anyio, pytest.mark.faults]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TcpPostgres, TcpPostgres]]:
    with (
        running(tmp_path_factory.mktemp("primary")) as primary,
        running(tmp_path_factory.mktemp("standby")) as standby,
    ):
        yield primary, standby


@pytest.fixture
async def primary(servers: tuple[TcpPostgres, TcpPostgres]) -> AsyncIterator[TcpPostgres]:
    server = servers[0]
    await server.set_read_only(False)
    await server.create_database()
    await anyio.to_thread.run_sync(server.migrate)
    yield server
    await server.set_read_only(False)


def settings_for(url: str) -> Settings:
    return Settings(database_url=url, pool_timeout=1, connect_timeout=1, statement_timeout=2)


async def make_stale(server: TcpPostgres) -> None:
    """Every session last seen long ago, so the next authenticated request wants to write."""
    async with connection_to(server.socket_url()) as connection:
        await connection.execute("UPDATE sessions SET last_seen_at = now() - interval '5 min'")


async def test_reads_answer_200_and_writes_503_while_the_database_is_read_only(
    primary: TcpPostgres,
) -> None:
    app = create_app(settings_for(primary.url))
    async with serving(app, check_openapi=True) as http:
        email = f"reader-{uuid.uuid4().hex[:6]}@example.org"
        token = await token_for(http, email)
        await make_stale(primary)
        await primary.set_read_only(True)

        # GET /auth/me would move last_seen_at: that write is best effort.
        for _ in range(3):
            assert (await http.get("/auth/me", headers=bearer(token))).status_code == 200
        assert (await http.get("/auth/sessions", headers=bearer(token))).status_code == 200
        assert (await http.get("/auth/events", headers=bearer(token))).status_code == 200
        for refused in (
            await login(http, email),
            await register(http, f"new-{uuid.uuid4().hex[:6]}@example.org"),
            await http.post("/auth/logout", headers=bearer(token)),
        ):
            body = assert_problem(refused, 503)
            assert refused.headers["retry-after"]
            assert "read-only" in body["detail"]

        await primary.set_read_only(False)
        assert (await login(http, email)).status_code == 200
        await poll_until(lambda: app.state.db_client.pool_stats().in_use == 0)


async def test_a_switchover_is_survived_without_a_restart(
    servers: tuple[TcpPostgres, TcpPostgres],
) -> None:
    old, new = servers
    for server in servers:
        await server.set_read_only(False)
        await server.create_database()
        await anyio.to_thread.run_sync(server.migrate)
    await new.set_read_only(True)  # a standby until the switchover
    url = (
        f"postgresql://postgres@127.0.0.1:{old.port},127.0.0.1:{new.port}/sparc"
        "?target_session_attrs=read-write"
    )
    app = create_app(settings_for(url))
    try:
        async with serving(app, check_openapi=True) as http:
            before = await registrations(http, 5)
            assert set(before) == {201}

            await old.set_read_only(True)  # the old primary steps down...
            await new.set_read_only(False)  # ...and the standby takes over
            switched_at = time.monotonic()
            statuses: list[int] = []
            while not statuses or statuses[-1] != 201:
                assert time.monotonic() - switched_at < 10, statuses
                statuses += await registrations(http, 1)
            assert set(statuses) <= {201, 503}
            healed_in = time.monotonic() - switched_at
            after = await registrations(http, 5)
            assert set(after) == {201}
            assert healed_in < 5
            await poll_until(lambda: app.state.db_client.pool_stats().in_use == 0)
    finally:
        await old.set_read_only(False)
        await new.set_read_only(False)
    # The writes after the switchover are on the new primary.
    assert await users_on(new) == len(after) + 1
    assert await users_on(old) == len(before)


async def test_sparc_migrate_takes_several_hosts_and_migrates_the_writable_one(
    servers: tuple[TcpPostgres, TcpPostgres], tmp_path: Path
) -> None:
    standby, primary = servers
    for server in servers:
        await server.set_read_only(False)
        await server.create_database()
    await standby.set_read_only(True)
    try:
        url = (
            f"postgresql://postgres@127.0.0.1:{standby.port},127.0.0.1:{primary.port}/sparc"
            "?target_session_attrs=read-write"
        )
        result = run_sparc("migrate", env=sparc_env(DATABASE_URL=url), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    finally:
        await standby.set_read_only(False)
    assert await has_schema(primary)
    assert not await has_schema(standby)


async def has_schema(server: TcpPostgres) -> bool:
    async with connection_to(server.socket_url()) as connection:
        return bool(await connection.fetchval("SELECT to_regclass('alembic_version') IS NOT NULL"))


async def registrations(http: httpx.AsyncClient, count: int) -> list[int]:
    statuses = []
    for _ in range(count):
        email = f"switch-{uuid.uuid4().hex[:8]}@example.org"
        statuses.append((await register(http, email, PASSWORD)).status_code)
    return statuses


async def users_on(server: TcpPostgres) -> int:
    async with connection_to(server.socket_url()) as connection:
        return int(await connection.fetchval("SELECT count(*) FROM users"))


async def test_a_lock_that_is_not_available_answers_503_not_500(
    settings: Settings, admin: asyncpg.Connection, notes: str
) -> None:
    async def write_note(request: Request) -> Response:
        db = get_db_client()
        await db.execute("SET LOCAL lock_timeout = '100ms'")
        await db.execute("INSERT INTO notes (body) VALUES ('waits for the lock')")
        return JSONResponse({})

    app = tiny_app(settings, write_note=write_note)
    async with serving(app) as http, admin.transaction():
        await admin.execute("LOCK TABLE notes IN ACCESS EXCLUSIVE MODE")
        response = await http.post("/write_note")
        assert_problem(response, 503)
        assert response.headers["retry-after"]
        assert app.state.client.pool_stats().in_use == 0


async def test_a_lock_not_available_at_commit_answers_503_not_500(
    settings: Settings, admin: asyncpg.Connection
) -> None:
    await admin.execute(
        """
        CREATE TABLE parents (id int PRIMARY KEY);
        CREATE TABLE children (
            parent_id int REFERENCES parents DEFERRABLE INITIALLY DEFERRED
        );
        INSERT INTO parents VALUES (1);
        """
    )

    async def add_child(request: Request) -> Response:
        db = get_db_client()
        await db.execute("SET LOCAL lock_timeout = '100ms'")
        # The foreign key is checked at COMMIT, where it needs a lock the admin holds.
        await db.execute("INSERT INTO children VALUES (1)")
        return JSONResponse({})

    app = tiny_app(settings, add_child=add_child)
    async with serving(app) as http, admin.transaction():
        await admin.execute("SELECT * FROM parents WHERE id = 1 FOR UPDATE")
        response = await http.post("/add_child")
        assert_problem(response, 503)
        assert response.headers["retry-after"]
    assert await admin.fetchval("SELECT count(*) FROM children") == 0
