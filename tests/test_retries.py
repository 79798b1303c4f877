"""Requests whose transaction lost a race (serialization_failure, deadlock_detected) are replayed.

The conflicts are real: two transactions under SERIALIZABLE that read what the other writes, two
that lock rows in opposite orders, and PostgreSQL's own error raised by a statement.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import anyio
import asyncpg
import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sparc.database import PoolEvents, QueryError, get_db_client, retry_on_conflict
from sparc.settings import Settings
from tests.conftest import serving
from tests.dbapp import insert_note, note_bodies, tiny_app
from tests.helpers import assert_problem

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

# A statement that fails the way a lost race does: PostgreSQL's own serialization_failure.
LOSE_THE_RACE = (
    "DO $$ BEGIN RAISE EXCEPTION 'lost a race' USING ERRCODE = 'serialization_failure'; END $$"
)


class CountingEvents(PoolEvents):
    retries = 0

    def transaction_retried(self) -> None:
        self.retries += 1


class Barrier:
    """Holds the first `parties` arrivals until all of them are there; later ones pass."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.everyone = anyio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived == self.parties:
            self.everyone.set()
        await self.everyone.wait()


async def test_serializable_write_skew_is_replayed_and_the_replay_sees_the_winner(
    settings: Settings, admin: asyncpg.Connection
) -> None:
    # The classic write skew: at least one doctor must stay on call. Both requests read "two on
    # call" before either writes, so under SERIALIZABLE one of them must fail, and its replay
    # then reads "one on call" and refuses.
    await admin.execute("CREATE TABLE doctors (name text PRIMARY KEY, on_call boolean NOT NULL)")
    await admin.execute("INSERT INTO doctors VALUES ('alice', true), ('bob', true)")
    both_read = Barrier(2)
    runs: list[str] = []

    async def go_off_call(request: Request) -> Response:
        name = request.query_params["name"]
        db = get_db_client()
        db.set_isolation("serializable")
        on_call = await db.fetch_val("SELECT count(*) FROM doctors WHERE on_call")
        runs.append(name)
        await both_read.wait()
        if on_call < 2:
            return JSONResponse({"off_call": False}, status_code=409)
        await db.execute("UPDATE doctors SET on_call = false WHERE name = :name", {"name": name})
        return JSONResponse({"off_call": True})

    events = CountingEvents()
    app = tiny_app(settings, events=events, off_call=go_off_call)
    statuses: dict[str, int] = {}
    async with serving(app) as http, anyio.create_task_group() as group:

        async def request(name: str) -> None:
            statuses[name] = (await http.put(f"/off_call?name={name}")).status_code

        group.start_soon(request, "alice")
        group.start_soon(request, "bob")
    assert sorted(statuses.values()) == [200, 409]
    # The loser ran again (more than once if its replay read before the winner committed).
    assert events.retries >= 1 and len(runs) == 2 + events.retries
    assert await admin.fetchval("SELECT count(*) FROM doctors WHERE on_call") == 1


async def test_a_deadlock_victim_is_replayed(settings: Settings, admin: asyncpg.Connection) -> None:
    await admin.execute("CREATE TABLE accounts (name text PRIMARY KEY, balance int NOT NULL)")
    await admin.execute("INSERT INTO accounts VALUES ('a', 100), ('b', 100)")
    both_locked = Barrier(2)

    async def transfer(request: Request) -> Response:
        source, target = request.query_params["from"], request.query_params["to"]
        db = get_db_client()
        update = "UPDATE accounts SET balance = balance + :delta WHERE name = :name"
        await db.execute(update, {"delta": -10, "name": source})
        await both_locked.wait()  # each holds its first row and now wants the other's
        await db.execute(update, {"delta": 10, "name": target})
        return JSONResponse({})

    events = CountingEvents()
    app = tiny_app(settings, events=events, transfer=transfer)
    statuses: list[int] = []
    async with serving(app) as http, anyio.create_task_group() as group:

        async def request(source: str, target: str) -> None:
            response = await http.put(f"/transfer?from={source}&to={target}")
            statuses.append(response.status_code)

        group.start_soon(request, "a", "b")
        group.start_soon(request, "b", "a")
    assert statuses == [200, 200]
    assert events.retries == 1
    rows = await admin.fetch("SELECT name, balance FROM accounts ORDER BY name")
    assert [tuple(row) for row in rows] == [("a", 100), ("b", 100)]


async def test_a_marked_post_is_replayed_with_the_same_body(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    bodies: list[object] = []

    @retry_on_conflict
    async def create(request: Request) -> Response:
        body = await request.json()
        bodies.append(body)
        await insert_note(body["text"])
        if len(bodies) == 1:
            await get_db_client().execute(LOSE_THE_RACE)
        return JSONResponse({}, status_code=201)

    async with serving(tiny_app(settings, create=create)) as http:
        response = await http.post("/create", json={"text": "only once"})
    assert response.status_code == 201
    assert bodies == [{"text": "only once"}] * 2
    assert await note_bodies(admin) == ["only once"]  # the first run's insert was rolled back


async def test_a_conflict_the_endpoint_swallowed_still_fails_the_commit_and_is_replayed(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    runs = 0

    async def careless(request: Request) -> Response:
        nonlocal runs
        runs += 1
        await insert_note(f"run {runs}")
        if runs == 1:
            with contextlib.suppress(QueryError):  # the transaction is aborted all the same
                await get_db_client().execute(LOSE_THE_RACE)
        return JSONResponse({})

    async with serving(tiny_app(settings, careless=careless)) as http:
        response = await http.put("/careless")
    assert response.status_code == 200 and runs == 2
    assert await note_bodies(admin) == ["run 2"]


async def test_an_unmarked_post_is_not_replayed_and_answers_503(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    runs = 0

    async def create(request: Request) -> Response:
        nonlocal runs
        runs += 1
        await insert_note("lost")
        await get_db_client().execute(LOSE_THE_RACE)
        return JSONResponse({}, status_code=201)

    async with serving(tiny_app(settings, create=create)) as http:
        response = await http.post("/create", json={})
    problem = assert_problem(response, 503)
    assert problem["title"] == "Transaction conflict"
    assert response.headers["Retry-After"] == "1"
    assert runs == 1
    assert await note_bodies(admin) == []


@pytest.mark.parametrize("attempts", [0, 1, 3])
async def test_replays_stop_after_db_retry_attempts(
    settings: Settings, attempts: int, notes: str, admin: asyncpg.Connection
) -> None:
    runs = 0

    async def always_loses(request: Request) -> Response:
        nonlocal runs
        runs += 1
        await insert_note(f"run {runs}")
        await get_db_client().execute(LOSE_THE_RACE)
        return JSONResponse({})

    app = tiny_app(replace(settings, retry_attempts=attempts), always_loses=always_loses)
    async with serving(app) as http:
        response = await http.get("/always_loses")
    assert_problem(response, 503)
    assert runs == 1 + attempts
    assert await note_bodies(admin) == []


async def test_a_request_whose_body_was_read_in_part_is_not_replayed(settings: Settings) -> None:
    runs = 0

    async def reads_a_little(request: Request) -> Response:
        nonlocal runs
        runs += 1
        async for _ in request.stream():
            break  # the first chunk only: the rest of the body is gone for a replay
        await get_db_client().execute(LOSE_THE_RACE)
        return JSONResponse({})

    async def chunks() -> httpx.AsyncByteStream:  # type: ignore[misc]
        for _ in range(3):
            yield b"chunk"

    async with serving(tiny_app(settings, reads_a_little=reads_a_little)) as http:
        response = await http.put("/reads_a_little", content=chunks())
    assert_problem(response, 503)
    assert runs == 1


async def test_a_body_too_big_to_keep_is_not_replayed(settings: Settings) -> None:
    runs = 0

    async def reads_it_all(request: Request) -> Response:
        nonlocal runs
        runs += 1
        assert len(await request.body()) == 2 * 1024 * 1024
        await get_db_client().execute(LOSE_THE_RACE)
        return JSONResponse({})

    async def two_mebibytes() -> httpx.AsyncByteStream:  # type: ignore[misc]
        for _ in range(32):
            yield b"x" * 65536

    async with serving(tiny_app(settings, reads_it_all=reads_it_all)) as http:
        response = await http.put("/reads_it_all", content=two_mebibytes())
    # Kept only up to 1 MiB for a replay, so this one is answered, not run again.
    assert_problem(response, 503)
    assert runs == 1


async def test_a_conflict_inside_a_task_group_is_replayed(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    runs = 0

    async def fan_out(request: Request) -> Response:
        nonlocal runs
        runs += 1
        await insert_note(f"run {runs}")
        async with anyio.create_task_group() as group:  # wraps the error in an ExceptionGroup
            if runs == 1:
                group.start_soon(get_db_client().execute, LOSE_THE_RACE)
        return JSONResponse({})

    async with serving(tiny_app(settings, fan_out=fan_out)) as http:
        response = await http.get("/fan_out")
    assert response.status_code == 200 and runs == 2
    assert await note_bodies(admin) == ["run 2"]


async def test_a_conflict_inside_a_task_group_that_cannot_be_replayed_answers_503(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    async def fan_out(request: Request) -> Response:
        await insert_note("lost")
        async with anyio.create_task_group() as group:
            group.start_soon(get_db_client().execute, LOSE_THE_RACE)
        return JSONResponse({})

    async with serving(tiny_app(settings, fan_out=fan_out)) as http:
        response = await http.post("/fan_out")  # not marked: no replay
    assert assert_problem(response, 503)["title"] == "Transaction conflict"
    assert await note_bodies(admin) == []


async def test_a_caught_conflict_answered_with_an_error_is_replayed(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    runs = 0

    async def careful(request: Request) -> Response:
        nonlocal runs
        runs += 1
        await insert_note(f"run {runs}")
        try:
            if runs == 1:
                await get_db_client().execute(LOSE_THE_RACE)
        except QueryError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse({})

    async with serving(tiny_app(settings, careful=careful)) as http:
        response = await http.put("/careful")
    assert response.status_code == 200 and runs == 2
    assert await note_bodies(admin) == ["run 2"]
