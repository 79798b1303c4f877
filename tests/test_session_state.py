"""A connection goes back to the pool with nothing of the last request's session left on it,
and without a reset round trip when no statement could have changed the session."""

from __future__ import annotations

from dataclasses import replace

import asyncpg
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sparc.database import get_db_client
from sparc.database.sql import changes_session
from sparc.settings import Settings
from tests.conftest import serving
from tests.dbapp import sparc_connections, tiny_app

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("sql", "changes"),
    [
        ("SELECT * FROM users WHERE id = $1", False),
        ("UPDATE users\n   SET email = $1 WHERE id = $2", False),
        ("INSERT INTO notes (body) VALUES ($1) RETURNING id", False),
        ("BEGIN; SET LOCAL statement_timeout = 30000", False),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", False),
        ("SELECT pg_advisory_xact_lock(1)", False),
        ("SET search_path = elsewhere", True),
        ("  set application_name = 'x'", True),
        ("SET SESSION statement_timeout = 0", True),
        ("-- a comment\nRESET ALL", True),
        ("SELECT 1; LISTEN news", True),
        ("SELECT set_config('app.user', $1, false)", True),
        ("SELECT pg_advisory_lock(42)", True),
        ("select pg_try_advisory_lock_shared(42)", True),
        ("CREATE TEMP TABLE scratch (id int)", True),
        ("create temporary table scratch (id int)", True),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", True),
        ("PREPARE q AS SELECT 1", True),
        ("DO $$ BEGIN PERFORM 1; END $$", True),
        ("CALL refresh_everything()", True),
    ],
)
def test_statements_that_may_change_the_session_are_recognised(sql: str, changes: bool) -> None:
    assert changes_session(sql) is changes


async def last_statement(admin: asyncpg.Connection) -> str:
    (connection,) = await sparc_connections(admin)
    query: str = await admin.fetchval(
        "SELECT query FROM pg_stat_activity WHERE pid = $1", connection["pid"]
    )
    return query


async def test_session_changes_are_undone_before_the_next_request(
    settings: Settings, admin: asyncpg.Connection
) -> None:
    async def change(request: Request) -> Response:
        db = get_db_client()
        await db.execute("SET search_path = nowhere")
        await db.execute("SELECT set_config('sparc.note', 'left behind', false)")
        return JSONResponse({})

    async def look(request: Request) -> Response:
        db = get_db_client()
        return JSONResponse(
            {
                "search_path": await db.fetch_val("SHOW search_path"),
                "note": await db.fetch_val("SELECT current_setting('sparc.note', true)"),
            }
        )

    app = tiny_app(replace(settings, pool_min_size=1, pool_max_size=1), change=change, look=look)
    async with serving(app) as http:
        assert (await http.post("/change")).status_code == 200
        assert "pg_advisory_unlock_all" in await last_statement(admin)  # the reset ran
        seen = (await http.get("/look")).json()
    assert seen["search_path"] == '"$user", public'
    assert seen["note"] in (None, "")


async def test_a_request_that_changed_nothing_costs_no_reset(
    settings: Settings, admin: asyncpg.Connection
) -> None:
    async def read(request: Request) -> Response:
        return JSONResponse({"one": await get_db_client().fetch_val("SELECT 1 AS sparc_read")})

    app = tiny_app(replace(settings, pool_min_size=1, pool_max_size=1), read=read)
    async with serving(app) as http:
        for _ in range(3):
            assert (await http.get("/read")).json() == {"one": 1}
            # The connection's last statement is the request's own COMMIT: no RESET ALL after it.
            assert await last_statement(admin) == "COMMIT"
