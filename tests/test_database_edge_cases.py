"""The unit of work's hard cases: failures, cancellations and tasks at awkward moments.

Each test states the invariant that matters: a 2xx answer means the writes were kept, a lost
write never hides behind a 2xx, and every connection goes back to the pool, never left idle
in a transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from uuid import uuid4

import anyio
import asyncpg
import httpx
import pytest
import sqlalchemy as sa
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sparc.database import DatabaseClient, QueryError, UniqueViolation, get_db_client
from sparc.settings import Settings
from tests.conftest import poll_until, serving
from tests.dbapp import (
    assert_all_or_nothing,
    hold_connection,
    insert_note,
    insert_then_hang,
    note_bodies,
    query_once,
    sparc_connections,
    tiny_app,
)

pytestmark = pytest.mark.anyio


async def assert_pool_clean(client: DatabaseClient, admin: asyncpg.Connection) -> None:
    await poll_until(lambda: client.pool_stats().in_use == 0)
    states = [row["state"] for row in await sparc_connections(admin)]
    assert not any(state and state.startswith("idle in transaction") for state in states), states


async def test_a_caught_statement_error_never_hides_behind_a_2xx(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    async def swallow(request: Request) -> Response:
        await insert_note("first")
        with contextlib.suppress(UniqueViolation):
            await insert_note("first")  # aborts the transaction in PostgreSQL
        return JSONResponse({})

    app = tiny_app(settings, swallow=swallow)
    async with serving(app) as http:
        response = await http.post("/swallow")
        await assert_pool_clean(app.state.client, admin)
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert await note_bodies(admin) == []


async def test_a_savepoint_contains_a_statement_error(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    async def careful(request: Request) -> Response:
        await insert_note("first")
        with contextlib.suppress(UniqueViolation):
            async with get_db_client().transaction():
                await insert_note("second")
                await insert_note("first")
        await insert_note("third")
        return JSONResponse({})

    async with serving(tiny_app(settings, careful=careful)) as http:
        assert (await http.post("/careful")).status_code == 200
    assert await note_bodies(admin) == ["first", "third"]


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.2])
async def test_a_statement_cancelled_by_the_endpoint_never_hides_a_lost_write(
    settings: Settings, notes: str, admin: asyncpg.Connection, delay: float
) -> None:
    async def impatient(request: Request) -> Response:
        db = get_db_client()
        await db.fetch_one_before_transaction("SELECT 1")
        with anyio.move_on_after(delay):
            await db.fetch_val("SELECT pg_sleep(0.5)")  # BEGIN or the statement is cut short
        await insert_note("after")
        return JSONResponse({})

    app = tiny_app(settings, impatient=impatient)
    async with serving(app, raise_app_exceptions=False) as http:
        response = await http.post("/impatient")
        await assert_pool_clean(app.state.client, admin)
    assert_all_or_nothing(response.status_code, await note_bodies(admin), ["after"])


async def test_a_cancelled_savepoint_block_never_hides_a_lost_write(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    async def nested(request: Request) -> Response:
        db = get_db_client()
        await insert_note("outer")
        with anyio.move_on_after(0.2):
            async with db.transaction():
                await insert_note("inner")
                await db.fetch_val("SELECT pg_sleep(1)")
        return JSONResponse({})

    app = tiny_app(settings, nested=nested)
    async with serving(app, raise_app_exceptions=False) as http:
        response = await http.post("/nested")
        await assert_pool_clean(app.state.client, admin)
    assert_all_or_nothing(response.status_code, await note_bodies(admin), ["outer"])


async def test_a_child_still_acquiring_when_the_request_fails_leaks_nothing(
    database_url: str, notes: str, admin: asyncpg.Connection
) -> None:
    settings = Settings(database_url=database_url, pool_min_size=0, pool_max_size=1, pool_timeout=5)
    holding, release = anyio.Event(), anyio.Event()

    async def fail_fast(request: Request) -> Response:
        async def fail() -> None:
            raise LookupError("fails while the sibling waits for the pool")

        await asyncio.gather(insert_note("never"), fail())
        return JSONResponse({})

    app = tiny_app(settings, hold=hold_connection(holding, release), fail_fast=fail_fast)
    async with serving(app) as http, anyio.create_task_group() as group:
        group.start_soon(http.get, "/hold")
        await holding.wait()
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as raw:
            assert (await raw.post("/fail_fast")).status_code == 500
        release.set()
        await assert_pool_clean(app.state.client, admin)
    assert await note_bodies(admin) == []


@pytest.mark.faults
async def test_cleanup_finishes_although_the_task_is_cancelled_twice(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    inserted = anyio.Event()
    app = tiny_app(settings, stuck=insert_then_hang("cancelled", inserted))
    async with serving(app) as http:
        task = asyncio.ensure_future(http.post("/stuck"))
        await inserted.wait()
        task.cancel()
        await asyncio.sleep(0)  # let the first cancellation land in the cleanup
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await assert_pool_clean(app.state.client, admin)
    assert await note_bodies(admin) == []


async def test_a_query_from_a_child_that_outlives_the_request_runs_on_its_own(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    finished = anyio.Event()
    children: list[asyncio.Task[None]] = []

    async def late_child() -> None:
        await anyio.sleep(0.05)  # still running when the response goes out
        await insert_note("late")
        finished.set()

    async def spawn(request: Request) -> Response:
        await insert_note("request")
        children.append(asyncio.ensure_future(late_child()))
        return JSONResponse({})

    app = tiny_app(settings, spawn=spawn)
    async with serving(app) as http:
        assert (await http.post("/spawn")).status_code == 200
        with anyio.fail_after(10):
            await finished.wait()
        await assert_pool_clean(app.state.client, admin)
    assert await note_bodies(admin) == ["request", "late"]


async def test_background_tasks_do_not_run_when_the_commit_failed(
    settings: Settings, admin: asyncpg.Connection
) -> None:
    await admin.execute(
        "CREATE TABLE pairs (id int PRIMARY KEY,"
        " partner int REFERENCES pairs (id) DEFERRABLE INITIALLY DEFERRED)"
    )
    ran: list[str] = []

    async def dangling(request: Request) -> Response:
        await get_db_client().execute("INSERT INTO pairs VALUES (1, 42)")
        return JSONResponse({}, background=BackgroundTask(ran.append, "welcome email"))

    async with serving(tiny_app(settings, dangling=dangling)) as http:
        assert (await http.post("/dangling")).status_code == 500
    assert ran == []


async def test_iterate_left_early_outside_a_unit_of_work_leaks_nothing(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    async with DatabaseClient(settings) as db:
        await db.execute_many("INSERT INTO notes (body) VALUES (:b)", [{"b": "a"}, {"b": "b"}])
        async with contextlib.aclosing(db.iterate("SELECT body FROM notes")) as rows:
            async for _ in rows:
                break
        await db.execute("INSERT INTO notes (body) VALUES ('after the loop')")  # autocommit
        assert db.pool_stats().in_use == 0
        assert "after the loop" in await note_bodies(admin)


async def test_named_parameters_are_whole_words() -> None:
    from sparc.database.sql import compile_text

    assert compile_text("SELECT ':abc:'") == ("SELECT ':abc:'", ())
    assert compile_text("SELECT :ab:c") == ("SELECT :ab:c", ())
    assert compile_text("SELECT :a, :b::int, :a") == ("SELECT $1, $2::int, $1", ("a", "b"))


async def test_execute_many_refuses_core_value_sets_with_different_keys(
    settings: Settings, notes: str
) -> None:
    table = sa.table("notes", sa.column("id"), sa.column("body"))
    async with DatabaseClient(settings) as db:
        with pytest.raises(ValueError, match="same keys"):
            await db.execute_many(table.insert(), [{"body": "x"}, {"id": 9, "body": "y"}])
        with pytest.raises(QueryError):
            await db.execute("INSERT INTO notes (nope) VALUES (1)")


@pytest.mark.faults
async def test_a_full_wait_queue_answers_503_at_once(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sparc.database")
    settings = Settings(
        database_url=database_url,
        pool_min_size=0,
        pool_max_size=1,
        pool_timeout=10,
        pool_max_waiting=1,
    )
    holding, release = anyio.Event(), anyio.Event()

    app = tiny_app(settings, hold=hold_connection(holding, release), query=query_once)
    results: dict[str, httpx.Response] = {}

    async def call(name: str, path: str) -> None:
        results[name] = await http.get(path)

    async with serving(app) as http, anyio.create_task_group() as group:
        group.start_soon(call, "holder", "/hold")
        await holding.wait()
        group.start_soon(call, "queued", "/query")
        await poll_until(lambda: app.state.client.pool_stats().waiting == 1)
        with anyio.fail_after(1):  # refused at once, not after DB_POOL_TIMEOUT
            refused = await http.get("/query")
        release.set()
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "busy" in refused.json()["detail"]
    assert "DB_POOL_MAX_WAITING=1" in caplog.text  # the detail goes only to the log
    assert results["holder"].status_code == 200
    assert results["queued"].status_code == 200


@pytest.mark.faults
async def test_a_runaway_statement_answers_503_and_leaves_the_connection_healthy(
    database_url: str, admin: asyncpg.Connection
) -> None:
    settings = Settings(
        database_url=database_url, pool_min_size=1, pool_max_size=1, statement_timeout=0.2
    )

    async def runaway(request: Request) -> Response:
        await get_db_client().fetch_val("SELECT pg_sleep(5)")
        return JSONResponse({})

    async def pid(request: Request) -> Response:
        return JSONResponse({"pid": await get_db_client().fetch_val("SELECT pg_backend_pid()")})

    app = tiny_app(settings, runaway=runaway, pid=pid)
    async with serving(app) as http:
        before = (await http.get("/pid")).json()["pid"]
        with anyio.fail_after(3):
            response = await http.get("/runaway")
        after = (await http.get("/pid")).json()["pid"]
        await assert_pool_clean(app.state.client, admin)
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert "cancel" in response.json()["detail"]
    assert after == before  # the same connection served on: nothing was discarded


@pytest.mark.faults
@pytest.mark.parametrize(("seconds", "shown"), [(60.0, "1min"), (0.0, "0")])
async def test_idle_in_transaction_timeout_is_set_on_pool_connections(
    database_url: str, seconds: float, shown: str
) -> None:
    settings = Settings(database_url=database_url, idle_in_transaction_timeout=seconds)
    async with DatabaseClient(settings) as db:
        assert await db.fetch_val("SHOW idle_in_transaction_session_timeout") == shown


@pytest.mark.faults
async def test_thousands_of_aborted_requests_leak_nothing(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    # Each request writes in a transaction across several round trips and is cancelled at a
    # random point: while acquiring, mid-statement, between statements, or while committing.
    async def busy(request: Request) -> Response:
        db = get_db_client()
        new_id = await db.execute(
            "INSERT INTO notes (body) VALUES (:b) RETURNING id", {"b": uuid4().hex}
        )
        await db.fetch_val("SELECT pg_sleep(0.001)")
        await db.execute("UPDATE notes SET body = body || '!' WHERE id = :id", {"id": new_id})
        return JSONResponse({})

    # A full pool from the start: the storm exercises cleanup, not connection opening.
    full = Settings(database_url=settings.database_url, pool_min_size=5, pool_max_size=5)
    app = tiny_app(full, busy=busy)
    completed = 0
    async with serving(app) as http:

        async def one(delay: float) -> None:
            nonlocal completed
            with anyio.move_on_after(delay):
                await http.post("/busy")
                completed += 1

        for _ in range(40):
            async with anyio.create_task_group() as group:
                for n in range(50):
                    group.start_soon(one, random.uniform(0, 0.01) * (1 + n % 3))
        await assert_pool_clean(app.state.client, admin)
    kept = await admin.fetchval("SELECT count(*) FROM notes")
    unfinished = await admin.fetchval("SELECT count(*) FROM notes WHERE body NOT LIKE '%!'")
    assert unfinished == 0  # no half-written request was committed
    assert kept >= completed  # every request that answered had its writes kept


async def test_requests_get_connections_in_the_order_they_asked(database_url: str) -> None:
    settings = Settings(database_url=database_url, pool_min_size=0, pool_max_size=1)
    holding, release = anyio.Event(), anyio.Event()
    served: list[int] = []

    async def numbered(request: Request) -> Response:
        await get_db_client().fetch_val("SELECT 1")
        served.append(int(request.query_params["n"]))
        return JSONResponse({})

    app = tiny_app(settings, hold=hold_connection(holding, release), numbered=numbered)
    async with serving(app) as http, anyio.create_task_group() as group:
        group.start_soon(http.get, "/hold")
        await holding.wait()
        for number in range(5):
            group.start_soon(http.get, f"/numbered?n={number}")
            await poll_until(lambda n=number: app.state.client.pool_stats().waiting == n + 1)
        release.set()
    # First come, first served: nobody who waited is overtaken by a later arrival.
    assert served == [0, 1, 2, 3, 4]
