"""SPARC behind a real PgBouncer in transaction mode (DB_PGBOUNCER=true).

PgBouncer gives each transaction whichever server connection is free, so nothing may rely on
session state: no cached prepared statements, no startup settings (PgBouncer refuses them).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import asyncpg
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sparc.app import create_app
from sparc.database import get_db_client
from sparc.settings import Settings
from tests.conftest import poll_until, serving
from tests.dbapp import hold_connection, insert_note, note_bodies, query_once, tiny_app
from tests.helpers import register
from tests.pgbouncer import PgBouncer, running_pgbouncer
from tests.processes import poll, run_sparc, sparc_env, start_serve, stop
from tests.smtp import SmtpServer

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

POOL_SIZE = 5  # PgBouncer's default_pool_size: server connections per database


@pytest.fixture
def pgbouncer(server_url: str) -> Iterator[PgBouncer]:
    with running_pgbouncer(server_url, pool_size=POOL_SIZE) as bouncer:
        yield bouncer


def behind(pgbouncer: PgBouncer, database_url: str, **overrides: object) -> Settings:
    options: dict[str, object] = {"pool_max_size": 10, "pool_timeout": 30.0}
    options.update(overrides)
    return Settings(
        database_url=pgbouncer.url_for(database_url),
        pgbouncer=True,
        statement_cache_size=0,
        **options,  # type: ignore[arg-type]
    )


class ServerConnections:
    """The peak number of server connections the test's database had while sampling."""

    peak = 0


@contextlib.asynccontextmanager
async def sampling_server_connections(
    admin: asyncpg.Connection,
) -> AsyncIterator[ServerConnections]:
    seen = ServerConnections()

    async def sample() -> None:
        while True:
            now: int = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
            seen.peak = max(seen.peak, now)
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as group:
        group.start_soon(sample)
        yield seen
        group.cancel_scope.cancel()


async def test_twenty_clients_share_five_server_connections_without_statement_errors(
    pgbouncer: PgBouncer, database_url: str, notes: str, admin: asyncpg.Connection
) -> None:
    async def write(request: Request) -> Response:
        body = request.query_params["body"]
        await insert_note(body)
        # Same statement text every time: with a statement cache it would be prepared once per
        # client connection and then missing on PgBouncer's other server connections.
        count = await get_db_client().fetch_val(
            "SELECT count(*) FROM notes WHERE body = :body", {"body": body}
        )
        return JSONResponse({"count": count})

    async def lookup(request: Request) -> Response:
        # Autocommit (no transaction): each statement may land on a different server connection.
        row = await get_db_client().fetch_one_before_transaction(
            "SELECT :n::int + 1 AS answer", {"n": 41}
        )
        assert row is not None
        return JSONResponse({"answer": row["answer"]})

    app = tiny_app(behind(pgbouncer, database_url), write=write, lookup=lookup)
    statuses: list[int] = []
    async with serving(app) as http, sampling_server_connections(admin) as connections:

        async def client(number: int) -> None:
            for turn in range(15):
                written = await http.post(f"/write?body=c{number}-{turn}")
                looked_up = await http.get("/lookup")
                statuses.extend((written.status_code, looked_up.status_code))
                assert written.json() == {"count": 1}
                assert looked_up.json() == {"answer": 42}

        async with anyio.create_task_group() as group:
            for number in range(20):
                group.start_soon(client, number)
    assert statuses == [200] * 600
    assert len(await note_bodies(admin)) == 300
    assert 1 <= connections.peak <= POOL_SIZE


async def test_timeouts_apply_to_every_transaction_though_pgbouncer_refuses_them_at_startup(
    pgbouncer: PgBouncer, database_url: str
) -> None:
    async def settings_in_force(request: Request) -> Response:
        db = get_db_client()
        await db.execute("SELECT 1")  # opens the request's transaction
        return JSONResponse(
            {
                "statement": await db.fetch_val("SHOW statement_timeout"),
                "idle": await db.fetch_val("SHOW idle_in_transaction_session_timeout"),
            }
        )

    async def runaway(request: Request) -> Response:
        await get_db_client().execute("SELECT pg_sleep(5)")
        return JSONResponse({})

    settings = behind(
        pgbouncer, database_url, statement_timeout=0.25, idle_in_transaction_timeout=7.0
    )
    app = tiny_app(settings, settings_in_force=settings_in_force, runaway=runaway)
    async with serving(app) as http:
        shown = await http.get("/settings_in_force")
        assert shown.json() == {"statement": "250ms", "idle": "7s"}
        with anyio.fail_after(3):
            cancelled = await http.get("/runaway")
        assert cancelled.status_code == 503
        assert cancelled.headers["content-type"] == "application/problem+json"
        assert (await http.get("/settings_in_force")).status_code == 200


def test_two_workers_with_pools_of_ten_share_five_server_connections(
    pgbouncer: PgBouncer, cli_database: str, tmp_path: Path
) -> None:
    env = sparc_env(
        DATABASE_URL=pgbouncer.url_for(cli_database),
        DB_PGBOUNCER="true",
        DB_POOL_MAX_SIZE="10",
        DB_POOL_TIMEOUT="30",
    )
    process, base = start_serve(env, "--workers", "2", cwd=tmp_path)  # migrates through PgBouncer
    try:
        ready = poll(f"{base}/readyz", process=process).json()
        assert ready["workers"] == 2 and ready["connection_bound"] == 20
        result = run_sparc(
            *("loadtest", "--url", base, "--json", "--concurrency", "60", "--duration", "3"),
            *("--login-ratio", "0.02"),
            # Connections are counted at the server itself, not through PgBouncer.
            *("--database-url", cli_database),
            env=sparc_env(),
        )
    finally:
        code, stderr = stop(process)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["requests"] > 0
    assert set(report["status_counts"]) == {"200"}, report["status_counts"]
    assert report["transport_errors"] == 0
    assert 1 <= report["peak_connections"] <= POOL_SIZE
    assert code == 0, stderr
    assert "Traceback" not in stderr


def test_migrations_run_again_and_again_through_pgbouncer(
    pgbouncer: PgBouncer, cli_database: str, tmp_path: Path
) -> None:
    # Each run is a new process on server connections that keep an earlier run's prepared
    # statements (asyncpg numbers its statements per process): names must never collide.
    env = sparc_env(DATABASE_URL=pgbouncer.url_for(cli_database), DB_PGBOUNCER="true")
    for _ in range(3):
        result = run_sparc("migrate", env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr


async def test_a_request_pgbouncer_keeps_waiting_gets_503_at_its_query_wait_timeout(
    server_url: str, database_url: str
) -> None:
    holding, release = anyio.Event(), anyio.Event()
    with running_pgbouncer(server_url, pool_size=1, query_wait_timeout=1) as bouncer:
        app = tiny_app(
            behind(bouncer, database_url),
            hold=hold_connection(holding, release),
            query=query_once,
        )
        async with serving(app) as http, anyio.create_task_group() as group:
            group.start_soon(http.get, "/hold")
            await holding.wait()  # PgBouncer's only server connection is in that transaction
            with anyio.fail_after(5):
                waited = await http.get("/query")
            release.set()
        assert waited.status_code == 503
        assert waited.headers["content-type"] == "application/problem+json"
        assert "Retry-After" in waited.headers


def test_pgbouncer_without_db_pgbouncer_stops_with_one_line_saying_so(
    pgbouncer: PgBouncer, cli_database: str, tmp_path: Path
) -> None:
    env = sparc_env(DATABASE_URL=pgbouncer.url_for(cli_database))
    result = run_sparc("migrate", env=env, cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.endswith(
        "refused the startup parameter statement_timeout: is this PgBouncer? set DB_PGBOUNCER=true"
    ), result.stderr


async def test_two_apps_behind_pgbouncer_deliver_each_mail_once(
    pgbouncer: PgBouncer, database_url: str, smtp: SmtpServer, tmp_path: Path
) -> None:
    # The delivery worker keeps no session state: its poll and its claims are single
    # statements, so transaction mode hands them any server connection.
    settings = replace(
        behind(pgbouncer, database_url), smtp_url=smtp.url, data_dir=tmp_path, pool_max_size=3
    )
    addresses = sorted(f"bounced{n}@example.org" for n in range(10))
    async with serving(create_app(settings)) as first, serving(create_app(settings)) as second:
        for n, address in enumerate(addresses):
            assert (await register([first, second][n % 2], address)).status_code == 201
        await poll_until(lambda: len(smtp.messages) >= len(addresses))
    assert sorted(message["To"] for message in smtp.messages) == addresses
