"""Instructions per GET /auth/me of the live server (uvicorn, uvloop, httptools), by callgrind.

Each app runs under `valgrind --tool=callgrind` twice: once serving only a warm-up, once serving
the warm-up and `--requests` more (64 in flight); the difference, divided by `--requests`, is
what one request costs the server process. Unlike req/s, the figure does not depend on what
else the machine is doing.

    python -m bench.instructions [--requests 1500] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import REPO_ROOT, bearer_token, database, free_port, server

APPS = {"sparc": "sparc.app:create_app", "bare": "bench.reference_apps:bare"}
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
                response = await http.get("/auth/me")
                if response.status_code != 200:
                    raise SystemExit(f"GET /auth/me answered {response.status_code}")

        await asyncio.gather(*(one() for _ in range(requests)))


def instructions(app: str, env: dict[str, str], token: str, requests: int) -> int:
    """Instructions the server process executed from start to exit, serving `requests`."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="sparc-callgrind-") as directory:
        log = Path(directory) / "valgrind.log"
        with log.open("w") as stderr:
            process = subprocess.Popen(
                [
                    *("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"),
                    *(sys.executable, "-m", "uvicorn", app, "--factory", "--port", str(port)),
                    *("--log-level", "warning", "--no-access-log"),
                    # Under valgrind a kept-alive connection can sit idle past uvicorn's 5 s
                    # default; the server then closes it just as the client reuses it.
                    *("--timeout-keep-alive", "600"),
                ],
                env={**os.environ, **env},
                cwd=REPO_ROOT,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
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
        match = re.search(r"Collected : (\d+)", log.read_text())
    if match is None:
        raise SystemExit("callgrind printed no instruction count")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--pool-size", type=int, default=10)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    with database(args.database_url) as url:
        env = {"DATABASE_URL": url, "BENCH_DATABASE_URL": url}
        env["DB_POOL_MAX_SIZE"] = str(args.pool_size)
        with server(APPS["sparc"], env) as sparc:
            token = bearer_token(sparc)
        per_request = {}
        for name, app in APPS.items():
            # The warm-up alone, then the warm-up and the measured requests.
            base_count = instructions(app, env, token, 0)
            full_count = instructions(app, env, token, args.requests)
            per_request[name] = (full_count - base_count) / args.requests
            print(f"{name:6} {per_request[name]:10,.0f} instructions per request", flush=True)
        print(f"bare / sparc: {per_request['bare'] / per_request['sparc']:.3f}")


if __name__ == "__main__":
    main()
