"""A tiny app with only the database middleware, and helpers to look at what it did."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import asyncpg
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sparc.database import APPLICATION_NAME, DatabaseClient, DatabaseMiddleware, get_db_client
from sparc.settings import Settings

Endpoint = Callable[[Request], Awaitable[Response]]


def tiny_app(settings: Settings, **endpoints: Endpoint) -> Starlette:
    """An app with only the database middleware and the given endpoints at /<name>."""
    client = DatabaseClient(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with client:
            yield

    routes = [
        Route(f"/{name}", endpoint, methods=["GET", "POST"]) for name, endpoint in endpoints.items()
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(DatabaseMiddleware, client=client)],
        lifespan=lifespan,
    )
    app.state.client = client
    return app


def post_scope(path: str) -> dict[str, object]:
    """The ASGI scope of a bare POST, for tests that drive the app without an HTTP client."""
    return {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}


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


async def sparc_connections(admin: asyncpg.Connection) -> list[asyncpg.Record]:
    return await admin.fetch(
        "SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = $1",
        APPLICATION_NAME,
    )
