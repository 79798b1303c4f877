"""The database layer: one pool per app, one unit of work per request, exact commit rules."""

from __future__ import annotations

import asyncio
import logging
import time

import anyio
import anyio.abc
import asyncpg
import httpx
import pytest
import sqlalchemy as sa
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sparc.database import (
    APPLICATION_NAME,
    DatabaseClient,
    DatabaseUnavailable,
    QueryError,
    UniqueViolation,
    bind_db_client,
    get_db_client,
)
from sparc.settings import Settings
from tests.conftest import poll_until, serving
from tests.dbapp import (
    get_while_held,
    hold_connection,
    insert_note,
    insert_then_hang,
    note_bodies,
    post_from_a_client_that_left,
    post_scope,
    query_once,
    sparc_connections,
    tiny_app,
)

pytestmark = pytest.mark.anyio

# -- one client, one pool ---------------------------------------------------------------------


async def test_get_db_client_is_one_object_across_requests(settings: Settings) -> None:
    async def which(request: Request) -> Response:
        return JSONResponse({"client": id(get_db_client())})

    app = tiny_app(settings, which=which)
    async with serving(app) as http:
        seen = {(await http.get("/which")).json()["client"] for _ in range(10)}
        seen |= {
            r.json()["client"]
            for r in await asyncio.gather(*(http.get("/which") for _ in range(10)))
        }
    assert seen == {id(app.state.client)}


def test_get_db_client_outside_a_request_says_how_to_get_one() -> None:
    with pytest.raises(RuntimeError, match="bind_db_client"):
        get_db_client()


async def test_bind_db_client_serves_code_outside_requests(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    async with DatabaseClient(settings) as client:
        with bind_db_client(client):
            assert get_db_client() is client
            await insert_note("from a job")
    assert await note_bodies(admin) == ["from a job"]


async def test_request_that_never_queries_takes_no_connection(settings: Settings) -> None:
    async def idle(request: Request) -> Response:
        return JSONResponse({"in_use": get_db_client().pool_stats().in_use})

    async with serving(tiny_app(settings, idle=idle)) as http:
        assert (await http.get("/idle")).json() == {"in_use": 0}


async def test_request_holds_one_connection_from_first_query_to_the_end(settings: Settings) -> None:
    async def pids(request: Request) -> Response:
        db = get_db_client()
        before = db.pool_stats().in_use
        seen = [await db.fetch_val("SELECT pg_backend_pid()") for _ in range(3)]
        seen += await asyncio.gather(*(db.fetch_val("SELECT pg_backend_pid()") for _ in range(3)))
        return JSONResponse({"before": before, "pids": seen, "in_use": db.pool_stats().in_use})

    async with serving(tiny_app(settings, pids=pids)) as http:
        body = (await http.get("/pids")).json()
    assert body["before"] == 0
    assert len(set(body["pids"])) == 1
    assert body["in_use"] == 1


# -- commit and rollback ----------------------------------------------------------------------


async def test_commit_happens_before_the_status_line_is_sent(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    async def create(request: Request) -> Response:
        await insert_note("visible")
        return JSONResponse({})

    app = tiny_app(settings, create=create)
    seen_at_start: list[list[str]] = []
    async with app.router.lifespan_context(app):

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, object]) -> None:
            if message["type"] == "http.response.start":
                seen_at_start.append(await note_bodies(admin))

        await app(post_scope("/create"), receive, send)
    assert seen_at_start == [["visible"]]


async def test_rollback_when_endpoint_raises(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    async def fail(request: Request) -> Response:
        await insert_note("lost")
        raise RuntimeError("boom")

    app = tiny_app(settings, fail=fail)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            assert (await http.post("/fail")).status_code == 500
        assert app.state.client.pool_stats().in_use == 0
    assert await note_bodies(admin) == []


@pytest.mark.parametrize(
    ("status", "keep_writes", "committed"),
    [
        (200, False, True),
        (201, False, True),
        (204, False, True),
        (303, False, True),
        (400, False, False),
        (401, False, False),
        (404, False, False),
        (409, False, False),
        (422, False, False),
        (500, False, False),
        (503, False, False),
        # keep_writes() keeps a 4xx answer's writes (a failed-login counter), never a 5xx's.
        (401, True, True),
        (429, True, True),
        (500, True, False),
        (503, True, False),
    ],
)
async def test_commit_rules_by_status(
    settings: Settings,
    notes: str,
    admin: asyncpg.Connection,
    status: int,
    keep_writes: bool,
    committed: bool,
) -> None:
    async def answer(request: Request) -> Response:
        await insert_note("written")
        if keep_writes:
            get_db_client().keep_writes()
        return Response(status_code=status, headers={"location": "/elsewhere"})

    async with serving(tiny_app(settings, answer=answer)) as http:
        assert (await http.post("/answer")).status_code == status
    assert await note_bodies(admin) == (["written"] if committed else [])


def test_keep_writes_outside_a_unit_of_work_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="keep_writes"):
        DatabaseClient(Settings()).keep_writes()


@pytest.mark.faults
async def test_rollback_when_client_went_away(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    async def create(request: Request) -> Response:
        await insert_note("nobody to tell")
        return JSONResponse({})

    app = tiny_app(settings, create=create)
    async with app.router.lifespan_context(app):
        await post_from_a_client_that_left(app, "/create")
        assert app.state.client.pool_stats().in_use == 0
    assert await note_bodies(admin) == []


async def test_endpoint_still_reads_its_body_after_the_disconnect_check(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    # The commit peeks at `receive` for a disconnect; a body the endpoint had not read yet
    # must still reach it afterwards.
    async def store_body_later(request: Request) -> None:
        await insert_note((await request.body()).decode())

    async def late_reader(request: Request) -> Response:
        await insert_note("committed first")
        return JSONResponse({}, background=BackgroundTask(store_body_later, request))

    async with serving(tiny_app(settings, late_reader=late_reader)) as http:
        response = await http.post("/late_reader", content=b"payload")
    assert response.status_code == 200
    assert await note_bodies(admin) == ["committed first", "payload"]


@pytest.mark.faults
async def test_rollback_when_request_is_cancelled(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    inserted = anyio.Event()
    app = tiny_app(settings, slow=insert_then_hang("cancelled", inserted))
    async with serving(app) as http:
        async with anyio.create_task_group() as group:
            group.start_soon(http.post, "/slow")
            await inserted.wait()
            group.cancel_scope.cancel()
        # The rollback finishes in a task of its own, shortly after the cancellation.
        await poll_until(lambda: app.state.client.pool_stats().in_use == 0)
        states = [row["state"] for row in await sparc_connections(admin)]
        assert "idle in transaction" not in states
    assert await note_bodies(admin) == []


async def test_failed_commit_answers_5xx_never_the_2xx(
    settings: Settings, admin: asyncpg.Connection
) -> None:
    # A deferred constraint is checked at COMMIT, so the endpoint itself succeeds.
    await admin.execute(
        "CREATE TABLE pairs (id int PRIMARY KEY,"
        " partner int REFERENCES pairs (id) DEFERRABLE INITIALLY DEFERRED)"
    )

    async def dangling(request: Request) -> Response:
        await get_db_client().execute("INSERT INTO pairs VALUES (1, 42)")
        return JSONResponse({"ok": True})

    app = tiny_app(settings, dangling=dangling)
    async with serving(app) as http:
        response = await http.post("/dangling")
        assert app.state.client.pool_stats().in_use == 0
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert "nothing was kept" in response.json()["detail"]
    assert await admin.fetchval("SELECT count(*) FROM pairs") == 0


# -- transaction per request ------------------------------------------------------------------


async def test_child_tasks_share_the_request_transaction(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    async def fan_out(request: Request) -> Response:
        db = get_db_client()

        async def child(n: int) -> tuple[int, int]:
            await insert_note(f"child {n}")
            row = await db.fetch_one("SELECT pg_backend_pid() AS pid, txid_current() AS xid")
            assert row is not None
            return row["pid"], row["xid"]

        seen = set(await asyncio.gather(*(child(n) for n in range(5))))
        async with anyio.create_task_group() as group:
            for n in range(5, 8):
                group.start_soon(insert_note, f"child {n}")
        # Every child saw the same connection and the same transaction.
        assert len(seen) == 1
        assert await db.fetch_val("SELECT count(*) FROM notes") == 8
        if request.query_params.get("fail"):
            return JSONResponse({}, status_code=409)
        return JSONResponse({})

    async with serving(tiny_app(settings, fan_out=fan_out)) as http:
        assert (await http.post("/fan_out?fail=1")).status_code == 409
        assert await note_bodies(admin) == []
        assert (await http.post("/fan_out")).status_code == 200
    assert len(await note_bodies(admin)) == 8


async def test_read_before_transaction_opens_no_transaction(settings: Settings) -> None:
    async def probe(request: Request) -> Response:
        db = get_db_client()
        stamp = "SELECT transaction_timestamp()"
        early = [await db.fetch_one_before_transaction(stamp) for _ in range(2)]
        late = [await db.fetch_val(stamp) for _ in range(2)]
        after = await db.fetch_one_before_transaction(stamp)  # now inside the transaction
        assert early[0] is not None and early[1] is not None and after is not None
        return JSONResponse(
            {
                "early_differ": early[0][0] != early[1][0],
                "late_same": late[0] == late[1] == after[0],
            }
        )

    async with serving(tiny_app(settings, probe=probe)) as http:
        assert (await http.get("/probe")).json() == {"early_differ": True, "late_same": True}


async def test_queries_after_the_response_started_run_in_autocommit(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    async def with_background(request: Request) -> Response:
        return JSONResponse(
            {}, status_code=400, background=BackgroundTask(insert_note, "background")
        )

    async with serving(tiny_app(settings, with_background=with_background)) as http:
        assert (await http.post("/with_background")).status_code == 400
    assert await note_bodies(admin) == ["background"]


# -- the pool's bounds ------------------------------------------------------------------------


@pytest.mark.faults
async def test_acquire_timeout_answers_503_quickly(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sparc.database")
    settings = Settings(
        database_url=database_url, pool_min_size=0, pool_max_size=1, pool_timeout=0.3
    )
    holding = anyio.Event()
    release = anyio.Event()

    app = tiny_app(settings, hold=hold_connection(holding, release), query=query_once)
    async with serving(app) as http:
        first, refused, elapsed = await get_while_held(
            http, "/query", holding=holding, release=release
        )
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["content-type"] == "application/problem+json"
    assert "busy" in refused.json()["detail"]
    assert "DB_POOL_TIMEOUT" in caplog.text  # the detail goes only to the log
    assert elapsed < 2.0
    assert first.status_code == 200


async def test_twenty_times_overload_never_exceeds_the_pool_bound(
    database_url: str, admin: asyncpg.Connection
) -> None:
    max_size = 3
    settings = Settings(
        database_url=database_url, pool_min_size=0, pool_max_size=max_size, pool_timeout=30
    )

    async def work(request: Request) -> Response:
        await get_db_client().fetch_val("SELECT pg_sleep(0.01)")
        return JSONResponse({})

    peak = 0
    done = anyio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, len(await sparc_connections(admin)))
            await anyio.sleep(0.005)

    async with serving(tiny_app(settings, work=work)) as http, anyio.create_task_group() as group:
        group.start_soon(sample)
        responses = await asyncio.gather(*(http.get("/work") for _ in range(20 * max_size)))
        done.set()
    assert [r.status_code for r in responses] == [200] * (20 * max_size)
    assert 1 <= peak <= max_size


@pytest.mark.faults
async def test_broken_connection_is_discarded_not_reused(
    settings: Settings, admin: asyncpg.Connection
) -> None:
    async def pid(request: Request) -> Response:
        return JSONResponse({"pid": await get_db_client().fetch_val("SELECT pg_backend_pid()")})

    killed = anyio.Event()

    async def dies(request: Request) -> Response:
        db = get_db_client()
        own = await db.fetch_val("SELECT pg_backend_pid()")
        await admin.execute("SELECT pg_terminate_backend($1)", own)
        killed.set()
        await db.fetch_val("SELECT 1")  # the connection is gone: DatabaseUnavailable -> 503
        return JSONResponse({})

    app = tiny_app(settings, pid=pid, dies=dies)
    async with serving(app) as http:
        before = (await http.get("/pid")).json()["pid"]
        response = await http.get("/dies")
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        after = (await http.get("/pid")).json()["pid"]
        assert app.state.client.pool_stats().in_use == 0
    assert after != before


# -- the query API, outside requests ----------------------------------------------------------


async def test_query_api(settings: Settings, notes: str) -> None:
    table = sa.table("notes", sa.column("id"), sa.column("body"))
    async with DatabaseClient(settings) as db:
        await db.execute_many(
            "INSERT INTO notes (body) VALUES (:body)", [{"body": "a"}, {"body": "b"}]
        )
        new_id = await db.execute(
            "INSERT INTO notes (body) VALUES (:body) RETURNING id", {"body": "c"}
        )
        assert new_id == 3
        rows = await db.fetch_all(
            "SELECT id, body FROM notes WHERE id >= :low ORDER BY id", {"low": 2}
        )
        assert [(row["id"], row[1]) for row in rows] == [(2, "b"), (3, "c")]
        assert await db.fetch_val("SELECT body FROM notes WHERE id = :id", {"id": 1}) == "a"
        assert await db.fetch_val("SELECT body FROM notes WHERE id = :id", {"id": 99}) is None
        # "::" is a cast, not a parameter; one name used twice is one parameter.
        assert await db.fetch_val("SELECT :n::int + :n::int", {"n": 2}) == 4
        assert await db.fetch_val("SELECT '10:30'::text") == "10:30"
        # SQLAlchemy Core is accepted too.
        await db.execute(table.insert(), {"body": "d"})
        core_rows = await db.fetch_all(sa.select(table.c.body).where(table.c.body.in_(["a", "d"])))
        assert sorted(row["body"] for row in core_rows) == ["a", "d"]
        with pytest.raises(ValueError, match="low"):
            await db.fetch_all("SELECT * FROM notes WHERE id >= :low")
        with pytest.raises(UniqueViolation) as caught:
            await db.execute("INSERT INTO notes (body) VALUES ('a')")
        assert caught.value.sqlstate == "23505"
        with pytest.raises(QueryError):
            await db.execute("SELECT * FROM no_such_table")
        assert db.pool_stats().in_use == 0


async def test_iterate_streams_rows_and_allows_queries_between_them(
    settings: Settings, notes: str
) -> None:
    async with DatabaseClient(settings) as db:
        await db.execute_many(
            "INSERT INTO notes (body) VALUES (:body)", [{"body": f"n{i}"} for i in range(250)]
        )
        seen = 0
        async with db.transaction():
            async for row in db.iterate("SELECT id FROM notes ORDER BY id", batch_size=100):
                seen += 1
                if row["id"] % 100 == 0:
                    assert await db.fetch_val("SELECT count(*) FROM notes") == 250
        assert seen == 250
        outside = [
            row["id"] async for row in db.iterate("SELECT id FROM notes WHERE id <= 3 ORDER BY id")
        ]
        assert outside == [1, 2, 3]
        assert db.pool_stats().in_use == 0


async def test_transaction_block_commits_or_rolls_back(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    async with DatabaseClient(settings) as db:
        async with db.transaction():
            await db.execute("INSERT INTO notes (body) VALUES ('committed')")
            pids = await asyncio.gather(
                *(db.fetch_val("SELECT pg_backend_pid()") for _ in range(4))
            )
            assert len(set(pids)) == 1
            assert await note_bodies(admin) == []  # not visible before commit
        with pytest.raises(LookupError):
            async with db.transaction():
                await db.execute("INSERT INTO notes (body) VALUES ('rolled back')")
                raise LookupError
        async with db.transaction():
            await db.execute("INSERT INTO notes (body) VALUES ('outer')")
            with pytest.raises(LookupError):
                async with db.transaction():  # a savepoint
                    await db.execute("INSERT INTO notes (body) VALUES ('inner')")
                    raise LookupError
        async with db.transaction(isolation="serializable"):
            assert await db.fetch_val("SHOW transaction_isolation") == "serializable"
        assert db.pool_stats().in_use == 0
    assert await note_bodies(admin) == ["committed", "outer"]


async def test_unreachable_database_fails_connect_naming_host_and_port(settings: Settings) -> None:
    unreachable = Settings(
        database_url="postgresql://sparc:hunter2@127.0.0.1:9/sparc", connect_timeout=2
    )
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as caught:
        await DatabaseClient(unreachable).connect()
    assert time.monotonic() - started < 4
    assert "127.0.0.1:9" in str(caught.value)
    assert "hunter2" not in str(caught.value)


# -- pool settings take effect ----------------------------------------------------------------


async def test_pool_opens_min_size_connections_at_startup(database_url: str) -> None:
    settings = Settings(database_url=database_url, pool_min_size=3, pool_max_size=4)
    async with DatabaseClient(settings) as db:
        stats = db.pool_stats()
    assert (stats.size, stats.idle, stats.in_use, stats.min, stats.max) == (3, 3, 0, 3, 4)


async def test_idle_connections_above_min_close_after_max_idle(database_url: str) -> None:
    settings = Settings(
        database_url=database_url, pool_min_size=1, pool_max_size=4, pool_max_idle=0.2
    )
    async with DatabaseClient(settings) as db:

        async def hold() -> None:
            async with db.transaction():
                await db.fetch_val("SELECT pg_sleep(0.05)")

        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(hold)
        assert db.pool_stats().size == 4
        await poll_until(lambda: db.pool_stats().size == 1)


@pytest.mark.parametrize(("seconds", "shown"), [(30.0, "30s"), (0.25, "250ms"), (0.0, "0")])
async def test_statement_timeout_is_set_on_pool_connections(
    database_url: str, seconds: float, shown: str
) -> None:
    settings = Settings(database_url=database_url, statement_timeout=seconds)
    async with DatabaseClient(settings) as db:
        assert await db.fetch_val("SHOW statement_timeout") == shown
        assert (
            await db.fetch_val(
                "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            )
            == APPLICATION_NAME
        )


async def test_statement_cache_can_be_turned_off(database_url: str) -> None:
    settings = Settings(database_url=database_url, statement_cache_size=0)
    async with DatabaseClient(settings) as db:
        for n in range(3):
            assert await db.fetch_val("SELECT :n::int * 2", {"n": n}) == n * 2
        assert await db.fetch_val("SELECT count(*) FROM pg_prepared_statements") == 0


@pytest.mark.faults
async def test_connect_timeout_bounds_a_server_that_never_answers() -> None:
    # A listening socket that completes the TCP handshake but never speaks PostgreSQL.
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    settings = Settings(
        database_url=f"postgresql://sparc:hunter2@127.0.0.1:{port}/sparc", connect_timeout=0.5
    )
    started = time.monotonic()
    try:
        with pytest.raises(DatabaseUnavailable) as caught:
            await DatabaseClient(settings).connect()
    finally:
        await listener.aclose()
    assert time.monotonic() - started < 3
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "DB_CONNECT_TIMEOUT" in str(caught.value)
    assert "hunter2" not in str(caught.value)
