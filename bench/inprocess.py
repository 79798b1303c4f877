"""CPU per request of GET /auth/me, SPARC against the bare app, with no HTTP server in the way.

Each app is driven in-process, one request after another, through its whole ASGI stack; the
figure is this process's CPU time per request (PostgreSQL's work is in its own process), so it
measures what the app layer costs. `--profile` adds cProfile's busiest functions, with calls
per request.

    python -m bench.inprocess [--requests 5000] [--profile] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import os
import pstats
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from bench import reference_apps
from bench.common import database
from sparc.app import create_app
from sparc.settings import Settings

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def drive(app: ASGIApp, token: str, requests: int, concurrency: int = 1) -> None:
    """Send `requests` GET /auth/me through `app`, `concurrency` at a time; each must be 200."""
    headers = [(b"host", b"bench"), (b"authorization", f"Bearer {token}".encode())]
    request = {"type": "http.request", "body": b"", "more_body": False}

    async def receive() -> dict[str, Any]:
        return request

    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def one() -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/auth/me",
            "raw_path": b"/auth/me",
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        await app(scope, receive, send)

    async def client(count: int) -> None:
        for _ in range(count):
            await one()

    share, extra = divmod(requests, concurrency)
    await asyncio.gather(*(client(share + (n < extra)) for n in range(concurrency)))
    if set(statuses) != {200}:
        raise SystemExit(f"not every request answered 200: {sorted(set(statuses))}")


async def measure(
    app: Any, token: str, requests: int, concurrency: int, profile: bool
) -> tuple[float, str]:
    async with app.router.lifespan_context(app):
        await drive(app, token, 500, concurrency)  # warm up: pool filled, caches primed
        gc.collect()
        profiler = cProfile.Profile() if profile else None
        started = time.process_time()
        if profiler is not None:
            profiler.enable()
        await drive(app, token, requests, concurrency)
        if profiler is not None:
            profiler.disable()
        cpu = time.process_time() - started
    report = ""
    if profiler is not None:
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
        stats.print_stats(25)
        report = out.getvalue()
    return cpu / requests * 1e6, report


async def login(app: Any) -> str:
    credentials = {"email": "inprocess@example.org", "password": "benchmark password"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            await http.post("/auth/register", json=credentials)
            response = await http.post("/auth/login", json=credentials)
            response.raise_for_status()
            token: str = response.json()["access_token"]
            return token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--concurrency", type=int, default=64, help="requests in flight (64, as bench.run)"
    )
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with database(args.database_url) as url:
        os.environ["BENCH_DATABASE_URL"] = url
        settings = Settings(database_url=url)
        token = asyncio.run(login(create_app(settings)))
        apps = {"sparc": lambda: create_app(settings), "bare": reference_apps.bare}
        figures: dict[str, list[float]] = {name: [] for name in apps}
        for _ in range(args.rounds):
            for name, make in apps.items():
                per_request, report = asyncio.run(
                    measure(make(), token, args.requests, args.concurrency, args.profile)
                )
                figures[name].append(per_request)
                print(f"{name:6} {per_request:7.1f} us CPU per request")
                if report:
                    print(report)
        best = {name: min(values) for name, values in figures.items()}
        print(
            f"best of {args.rounds}: sparc {best['sparc']:.1f} us, bare {best['bare']:.1f} us, "
            f"ratio {best['bare'] / best['sparc']:.2f}x"
        )


if __name__ == "__main__":
    main()
