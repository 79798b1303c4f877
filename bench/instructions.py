"""Instructions per GET /auth/me of the live server (uvicorn, uvloop, httptools), by callgrind.

Each app runs under `valgrind --tool=callgrind` twice: once serving only a warm-up, once serving
the warm-up and `--requests` more (64 in flight); the difference, divided by `--requests`, is
what one request costs the server process. Unlike req/s, the figure does not depend on what
else the machine is doing.

    python -m bench.instructions [--requests 1500] [--database-url URL] [--only NAME ...]

The targets: `sparc serve` as shipped (its access log on, and off with SPARC_ACCESS_LOG=false),
SPARC's app under a bare uvicorn line (no access log, as bench.run measured it before), and the
bare asyncpg app.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import (
    REPO_ROOT,
    SPARC_SERVE,
    bearer_token,
    database,
    free_port,
    server,
    server_command,
)

# Each target: what serves it and the environment it gets on top of the database's.
TARGETS: dict[str, tuple[str, dict[str, str]]] = {
    "sparc serve": (SPARC_SERVE, {}),
    "sparc serve, SPARC_ACCESS_LOG=false": (SPARC_SERVE, {"SPARC_ACCESS_LOG": "false"}),
    "sparc app, uvicorn --no-access-log": ("sparc.app:create_app", {}),
    "bare": ("bench.reference_apps:bare", {}),
}
WARM_UP = 200
IN_FLIGHT = 64


async def load(base: str, token: str, requests: int) -> None:
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    headers = {"Authorization": f"Bearer {token}"}
    client = httpx.AsyncClient(base_url=base, limits=limits, headers=headers, timeout=300)
    async with client as http:
        turns = asyncio.Semaphore(IN_FLIGHT)

        async def one() -> None:
            async with turns:
                for attempt in range(3):
                    try:
                        response = await http.get("/auth/me")
                        break
                    except (httpx.ReadError, httpx.RemoteProtocolError):
                        # Under valgrind a kept-alive connection can sit idle past uvicorn's
                        # 5 s; the server closes it, unread, just as the client reuses it.
                        if attempt == 2:
                            raise
                if response.status_code != 200:
                    raise SystemExit(f"GET /auth/me answered {response.status_code}")

        await asyncio.gather(*(one() for _ in range(requests)))


def instructions(app: str, env: dict[str, str], token: str, requests: int) -> int:
    """Instructions the server process executed from start to exit, serving `requests`."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="sparc-callgrind-") as directory:
        report = Path(directory) / "valgrind.log"
        # What the server logs (its access log among it) goes to a file, as in production.
        with (Path(directory) / "server.log").open("w") as server_log:
            process = subprocess.Popen(
                [
                    *("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"),
                    f"--log-file={report}",
                    *server_command(app, port),
                ],
                env={**os.environ, **env},
                cwd=REPO_ROOT,
                stdout=server_log,
                stderr=server_log,
            )
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 600  # valgrind makes startup slow
            while True:
                try:
                    httpx.get(f"{base}/healthz", timeout=5)
                    break
                except httpx.TransportError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"{app} did not start under valgrind") from None
                    time.sleep(0.5)
            asyncio.run(load(base, token, WARM_UP + requests))
            process.send_signal(signal.SIGINT)
            process.wait(timeout=600)
        match = re.search(r"Collected : (\d+)", report.read_text())
    if match is None:
        raise SystemExit("callgrind printed no instruction count")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--only", nargs="+", choices=TARGETS, help="measure only these targets")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    with database(args.database_url) as url:
        env = {"DATABASE_URL": url, "BENCH_DATABASE_URL": url}
        env["DB_POOL_MAX_SIZE"] = str(args.pool_size)
        with server(SPARC_SERVE, env) as sparc:
            token = bearer_token(sparc)
        per_request = {}
        for name in args.only or TARGETS:
            app, extra_env = TARGETS[name]
            # The warm-up alone, then the warm-up and the measured requests.
            base_count = instructions(app, env | extra_env, token, 0)
            full_count = instructions(app, env | extra_env, token, args.requests)
            per_request[name] = (full_count - base_count) / args.requests
            print(f"{name:38} {per_request[name]:10,.0f} instructions per request", flush=True)
        if "bare" in per_request:
            for name, count in per_request.items():
                print(f"bare / {name}: {per_request['bare'] / count:.3f}")


if __name__ == "__main__":
    main()
