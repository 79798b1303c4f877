"""The two apps SPARC is measured against, serving the same GET /auth/me lookup.

* `bare`: Starlette and one asyncpg pool, the lookup on a pooled connection, no transaction:
  the floor of what any pooled service can cost.
* `per_request`: opens a new connection for every request, as the old get_db_client() did.

Run one with uvicorn's factory mode, e.g.
    BENCH_DATABASE_URL=postgresql://... uvicorn bench.reference_apps:bare --factory
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

LOOKUP = """
    SELECT s.id AS session_id, u.id, u.email, u.created_at
    FROM sessions s JOIN users u ON u.id = s.user_id
    WHERE s.token_hash = $1 AND s.expires_at > now()
"""


def _token_hash(request: Request) -> bytes | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return hashlib.sha256(token.strip().encode()).digest()


def _answer(row: asyncpg.Record | None) -> Response:
    if row is None:
        return JSONResponse({"detail": "unauthorized"}, status_code=401)
    return JSONResponse(
        {"id": str(row["id"]), "email": row["email"], "created_at": row["created_at"].isoformat()}
    )


def _url() -> str:
    return os.environ["BENCH_DATABASE_URL"]


def bare() -> Starlette:
    pool: asyncpg.Pool | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal pool
        size = int(os.environ.get("DB_POOL_MAX_SIZE", "10"))
        pool = await asyncpg.create_pool(_url(), min_size=1, max_size=size)
        try:
            yield
        finally:
            await pool.close()

    async def me(request: Request) -> Response:
        token_hash = _token_hash(request)
        if token_hash is None:
            return _answer(None)
        assert pool is not None
        async with pool.acquire() as connection:
            return _answer(await connection.fetchrow(LOOKUP, token_hash))

    return Starlette(routes=[Route("/auth/me", me)], lifespan=lifespan)


def per_request() -> Starlette:
    async def me(request: Request) -> Response:
        token_hash = _token_hash(request)
        if token_hash is None:
            return _answer(None)
        connection = await asyncpg.connect(_url())
        try:
            return _answer(await connection.fetchrow(LOOKUP, token_hash))
        finally:
            await connection.close()

    return Starlette(routes=[Route("/auth/me", me)])
