"""SPARC's database layer in a FastAPI app (examples/fastapi_app.py): the transaction-per-request
rules hold there, through FastAPI's dependencies, exception handling and validation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Literal

import anyio
import asyncpg
import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse

from examples.fastapi_app import NewNote, create_app
from sparc.database import get_db_client
from sparc.settings import Settings
from tests.conftest import poll_until_async, serving
from tests.dbapp import (
    get_while_held,
    hold_connection,
    insert_note,
    insert_then_hang,
    note_bodies,
    post_from_a_client_that_left,
    sparc_connections,
)

pytestmark = pytest.mark.anyio


def app_with(settings: Settings, router: APIRouter | None = None) -> FastAPI:
    """The example app, plus the test's own endpoints."""
    app = create_app(settings)
    if router is not None:
        app.include_router(router)
    return app


@pytest.fixture
async def http(settings: Settings, notes: str) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(app_with(settings)) as client:
        yield client


async def backend_and_transaction() -> tuple[int, int]:
    row = await get_db_client().fetch_one("SELECT pg_backend_pid(), txid_current()")
    assert row is not None
    return row[0], row[1]


# -- the example's own endpoints --------------------------------------------------------------


async def test_a_write_below_400_is_committed(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    response = await http.post("/notes", json={"body": "kept"})
    assert response.status_code == 201
    assert response.json() == {"id": 1, "body": "kept"}
    assert await note_bodies(admin) == ["kept"]


async def test_an_http_exception_rolls_back_the_writes_before_it(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    response = await http.post("/notes/batch", json=[{"body": "a"}, {"body": "b"}, {"body": "a"}])
    assert response.status_code == 409
    assert await note_bodies(admin) == []
    assert (await http.post("/notes/batch", json=[{"body": "a"}, {"body": "b"}])).status_code == 201
    assert await note_bodies(admin) == ["a", "b"]


async def test_dependencies_read_in_the_request_transaction(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    created = (await http.post("/notes", json={"body": "to delete"})).json()
    assert (await http.get(f"/notes/{created['id']}")).json() == created
    assert (await http.delete(f"/notes/{created['id']}")).status_code == 204
    assert (await http.delete(f"/notes/{created['id']}")).status_code == 404
    assert await note_bodies(admin) == []


async def test_child_tasks_of_the_example_share_its_transaction(http: httpx.AsyncClient) -> None:
    await http.post("/notes/batch", json=[{"body": "short"}, {"body": "the longest"}])
    assert (await http.get("/notes/summary")).json() == {"count": 2, "longest": "the longest"}


async def test_an_exhausted_pool_answers_503_with_retry_after(
    database_url: str, notes: str
) -> None:
    settings = Settings(
        database_url=database_url, pool_min_size=0, pool_max_size=1, pool_timeout=0.3
    )
    holding, release = anyio.Event(), anyio.Event()
    router = APIRouter()
    router.add_api_route("/hold", hold_connection(holding, release))
    async with serving(app_with(settings, router)) as http:
        held, refused, elapsed = await get_while_held(
            http, "/notes", holding=holding, release=release
        )
    assert held.status_code == 200
    assert refused.status_code == 503
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["retry-after"] == "1"
    assert elapsed < 2.0


# -- the rules, through FastAPI's machinery ---------------------------------------------------


async def test_an_endpoint_and_its_dependencies_share_one_connection_and_transaction(
    settings: Settings,
) -> None:
    router = APIRouter()

    @router.get("/where")
    async def where(
        seen_by_dependency: tuple[int, int] = Depends(backend_and_transaction),
    ) -> dict[str, list[int]]:
        return {
            "dependency": list(seen_by_dependency),
            "endpoint": list(await backend_and_transaction()),
        }

    async with serving(app_with(settings, router)) as http:
        body = (await http.get("/where")).json()
    assert body["dependency"] == body["endpoint"]


async def test_rollback_when_an_endpoint_raises(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    router = APIRouter()

    @router.post("/fail")
    async def fail() -> None:
        await insert_note("lost")
        raise RuntimeError("boom")

    app = app_with(settings, router)
    async with serving(app, raise_app_exceptions=False) as http:
        assert (await http.post("/fail")).status_code == 500
    assert await note_bodies(admin) == []


async def test_a_dependencys_writes_roll_back_when_the_body_is_invalid(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    # FastAPI runs the dependencies before it validates the body.
    async def writes() -> None:
        await insert_note("by the dependency")

    router = APIRouter()

    @router.post("/validated", dependencies=[Depends(writes)])
    async def validated(note: NewNote) -> NewNote:
        return note

    async with serving(app_with(settings, router)) as http:
        assert (await http.post("/validated", json={"body": ""})).status_code == 422
        assert await note_bodies(admin) == []
        assert (await http.post("/validated", json={"body": "fine"})).status_code == 200
    assert await note_bodies(admin) == ["by the dependency"]


@pytest.mark.parametrize(
    ("status", "committed"), [(200, True), (303, True), (404, False), (500, False)]
)
async def test_commit_rules_by_status_hold_for_http_exception_and_responses(
    settings: Settings, notes: str, admin: asyncpg.Connection, status: int, committed: bool
) -> None:
    router = APIRouter()

    @router.post("/answer")
    async def answer() -> JSONResponse:
        await insert_note("written")
        if status >= 400:
            raise HTTPException(status, "no")
        return JSONResponse({}, status_code=status, headers={"location": "/elsewhere"})

    async with serving(app_with(settings, router)) as http:
        assert (await http.post("/answer")).status_code == status
    assert await note_bodies(admin) == (["written"] if committed else [])


async def test_child_tasks_share_the_transaction_and_its_rollback(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    router = APIRouter()

    @router.post("/fan-out")
    async def fan_out(fail: bool = False) -> dict[str, int]:
        seen = set(await asyncio.gather(*(backend_and_transaction() for _ in range(4))))
        async with anyio.create_task_group() as group:
            for n in range(3):
                group.start_soon(insert_note, f"child {n}")
        if fail:
            raise HTTPException(409, "changed our mind")
        return {"connections_and_transactions": len(seen | {await backend_and_transaction()})}

    async with serving(app_with(settings, router)) as http:
        assert (await http.post("/fan-out?fail=true")).status_code == 409
        assert await note_bodies(admin) == []
        response = await http.post("/fan-out")
    assert response.json() == {"connections_and_transactions": 1}
    assert sorted(await note_bodies(admin)) == ["child 0", "child 1", "child 2"]


@pytest.mark.faults
async def test_rollback_when_the_client_went_away(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    router = APIRouter()

    @router.post("/create")
    async def create() -> dict[str, bool]:
        await insert_note("nobody to tell")
        return {"ok": True}

    app = app_with(settings, router)
    async with app.router.lifespan_context(app):
        sent = await post_from_a_client_that_left(app, "/create")
    assert sent[0]["status"] == 200  # the endpoint answered; nobody was there to read it
    assert await note_bodies(admin) == []


@pytest.mark.faults
async def test_rollback_when_the_request_is_cancelled(
    settings: Settings, notes: str, admin: asyncpg.Connection
) -> None:
    inserted = anyio.Event()
    router = APIRouter()
    router.add_api_route("/slow", insert_then_hang("cancelled", inserted), methods=["POST"])
    app = app_with(settings, router)
    async with serving(app) as http:
        async with anyio.create_task_group() as group:
            group.start_soon(http.post, "/slow")
            await inserted.wait()
            group.cancel_scope.cancel()

        # The rollback finishes in a task of its own, shortly after the cancellation: until
        # the connection is idle again, an uncommitted note would be invisible anyway.
        async def transaction_over() -> bool:
            states = {row["state"] for row in await sparc_connections(admin)}
            return not states & {"idle in transaction", "active"}

        await poll_until_async(transaction_over)
    assert await note_bodies(admin) == []


# -- dependencies with yield ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "kept"),
    [
        # Ends before the response: inside the transaction, rolled back with the 404.
        ("function", []),
        # Ends after the response was sent: after the rollback, in autocommit, so it is kept.
        (None, ["after the response"]),
    ],
)
async def test_where_a_yield_dependency_ends_decides_its_transaction(
    settings: Settings,
    notes: str,
    admin: asyncpg.Connection,
    scope: Literal["function"] | None,
    kept: list[str],
) -> None:
    async def with_teardown() -> AsyncIterator[None]:
        yield
        await insert_note("after the response" if scope is None else "before the response")

    router = APIRouter()

    @router.post("/missing", dependencies=[Depends(with_teardown, scope=scope)])
    async def missing() -> JSONResponse:
        # An answer, not an exception: FastAPI throws an exception into the dependency at its
        # `yield`, and the code after it would not run at all.
        return JSONResponse({"detail": "nothing here"}, status_code=404)

    async with serving(app_with(settings, router)) as http:
        assert (await http.post("/missing")).status_code == 404
    assert await note_bodies(admin) == kept
