"""Health probes: liveness without the database, readiness through the pool."""

from __future__ import annotations

from dataclasses import asdict

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sparc.database import get_db_client
from sparc.migrations import head_revision, schema_revision
from sparc.openapi_parts import Operations, json_answer, operation
from sparc.settings import serve_workers


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 with this worker's pool figures, the service's connection bound and the schema's
    revision when a pooled connection answers; else 503."""
    db = get_db_client()
    pool = db.pool_stats()  # read before this probe takes a connection of its own
    # Read on every probe, in place of a SELECT 1: during a rolling upgrade it moves on under
    # a running instance. A DatabaseUnavailable becomes a 503 problem in DatabaseMiddleware.
    revision = await schema_revision(db)
    figures = asdict(pool)
    workers = serve_workers()
    return JSONResponse(
        {
            "status": "ready",
            "pool": {key: figures[key] for key in ("size", "idle", "in_use", "max")},
            # The most connections the service may open: each worker has a pool of its own.
            "workers": workers,
            "connection_bound": workers * pool.max,
            "schema": {"revision": revision, "head": head_revision()},
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
        {"200": json_answer("Ready", "Ready, with the pool's figures and the schema revision.")},
    ),
}
