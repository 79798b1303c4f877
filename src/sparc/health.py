"""Health probes: liveness without the database, readiness through the pool."""

from __future__ import annotations

from dataclasses import asdict

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sparc.database import get_db_client


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 with the pool's figures when a pooled connection answers SELECT 1; else 503."""
    db = get_db_client()
    pool = db.pool_stats()  # read before this probe takes a connection of its own
    # A DatabaseUnavailable raised here becomes a 503 problem in DatabaseMiddleware.
    await db.fetch_one_before_transaction("SELECT 1")
    figures = asdict(pool)
    return JSONResponse(
        {
            "status": "ready",
            "pool": {key: figures[key] for key in ("size", "idle", "in_use", "max")},
        }
    )


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
