"""Health probes: liveness without the database, readiness through the pool."""

from __future__ import annotations

from dataclasses import asdict

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sparc.database import get_db_client
from sparc.openapi_parts import Operations, json_answer, operation
from sparc.settings import serve_workers


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
    workers = serve_workers()
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
operations: Operations = {
    healthz: operation("Liveness: the process runs", {"200": json_answer("Health", "Alive.")}),
    readyz: operation(
        "Readiness: a pooled connection answers",
        {"200": json_answer("Ready", "Ready, with the pool's figures.")},
    ),
}
