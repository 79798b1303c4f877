"""Health probes: liveness without the database, readiness through the pool."""

from __future__ import annotations

import os
from dataclasses import asdict

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sparc.database import get_db_client

# Set by `sparc serve` for its workers, so each can state the service's whole connection bound.
WORKERS_VARIABLE = "SPARC_WORKERS"


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 with this worker's pool figures and the service's connection bound when a pooled
    connection answers SELECT 1; else 503."""
    db = get_db_client()
    pool = db.pool_stats()  # read before this probe takes a connection of its own
    # A DatabaseUnavailable raised here becomes a 503 problem in DatabaseMiddleware.
    await db.fetch_one_before_transaction("SELECT 1")
    figures = asdict(pool)
    workers = int(os.environ.get(WORKERS_VARIABLE) or 1)
    return JSONResponse(
        {
            "status": "ready",
            "pool": {key: figures[key] for key in ("size", "idle", "in_use", "max")},
            # The most connections the service may open: each worker has a pool of its own.
            "workers": workers,
            "connection_bound": workers * pool.max,
        }
    )


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
