"""A tiny app with only the database middleware, and helpers to look at what it did."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import asyncpg
import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Scope

from sparc.database import (
    APPLICATION_NAME,
    DatabaseClient,
    DatabaseMiddleware,
    PoolEvents,
    get_db_client,
)
from sparc.settings import Settings

Endpoint = Callable[[Request], Awaitable[Response]]


def tiny_app(
    settings: Settings,
    *,
    events: PoolEvents | None = None,
    on_answered: Callable[[Scope, int, float], None] | None = None,
    **endpoints: Endpoint,
) -> Starlette:
    """An app with only the database middleware and the given endpoints at /<name>."""
    client = DatabaseClient(settings, events=events)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with client:
            yield

    routes = [
        Route(f"/{name}", endpoint, methods=["GET", "POST", "PUT"])
        for name, endpoint in endpoints.items()
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(DatabaseMiddleware, client=client, on_answered=on_answered)],
        lifespan=lifespan,
    )
    app.state.client = client
    return app


def post_scope(path: str) -> dict[str, object]:
    """The ASGI scope of a bare POST, for tests that drive the app without an HTTP client."""
    return {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}


async def post_from_a_client_that_left(app: ASGIApp, path: str) -> list[Message]:
    """POST `path` to `app` (its lifespan running) from a client that disconnects right after
    its empty body; the messages the app sent."""
    messages: list[Message] = [
        {"type": "http.request", "body": b"", "more_body": False},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: Message) -> None:
        sent.append(message)

    await app(post_scope(path), receive, send)
    return sent


async def note_bodies(admin: asyncpg.Connection) -> list[str]:
    return [row["body"] for row in await admin.fetch("SELECT body FROM notes ORDER BY id")]


async def insert_note(body: str) -> None:
    await get_db_client().execute("INSERT INTO notes (body) VALUES (:body)", {"body": body})


def insert_then_hang(body: str, inserted: anyio.Event) -> Endpoint:
    """An endpoint that writes a note, says so, then waits until it is cancelled."""

    async def endpoint(request: Request) -> Response:
        await insert_note(body)
        inserted.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable: the request is cancelled")

    return endpoint


def hold_connection(holding: anyio.Event, release: anyio.Event) -> Endpoint:
    """An endpoint that takes a pooled connection and keeps it until `release` is set."""

    async def endpoint(request: Request) -> Response:
        await get_db_client().fetch_val("SELECT 1")
        holding.set()
        await release.wait()
        return JSONResponse({})

    return endpoint


async def get_while_held(
    http: httpx.AsyncClient, path: str, *, holding: anyio.Event, release: anyio.Event
) -> tuple[httpx.Response, httpx.Response, float]:
    """GET `path` while GET /hold (a `hold_connection` endpoint) keeps a pooled connection:
    the answer to /hold, the answer to `path`, and the seconds `path` took."""
    held: list[httpx.Response] = []

    async def hold() -> None:
        held.append(await http.get("/hold"))

    async with anyio.create_task_group() as group:
        group.start_soon(hold)
        await holding.wait()
        started = time.monotonic()
        answer = await http.get(path)
        elapsed = time.monotonic() - started
        release.set()
    return held[0], answer, elapsed


async def query_once(request: Request) -> Response:
    """An endpoint that needs one pooled connection for one statement."""
    await get_db_client().fetch_val("SELECT 1")
    return JSONResponse({})


def assert_all_or_nothing(status: int, kept: list[str], expected: list[str]) -> None:
    """A 200 kept exactly the endpoint's writes; anything else is a 5xx that kept none."""
    if status == 200:
        assert kept == expected
    else:
        assert status >= 500 and kept == []


async def sparc_connections(admin: asyncpg.Connection) -> list[asyncpg.Record]:
    return await admin.fetch(
        "SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = $1",
        APPLICATION_NAME,
    )
