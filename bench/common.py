"""What the benchmarks share: a database to point at, a server process, wrk, percentiles."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from sparc.embedded import embedded_postgres
from sparc.migrations import upgrade

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def database(url: str | None) -> Iterator[str]:
    """`url`, migrated; or a throwaway embedded PostgreSQL when it is None."""
    with contextlib.ExitStack() as stack:
        if url is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sparc-bench-")))
            url = stack.enter_context(embedded_postgres(data_dir))
        upgrade(url)
        yield url


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# What a user runs: `sparc serve` with its defaults (uvicorn with uvloop and httptools, one
# worker, SPARC's access log on), as opposed to an app under a hand-written uvicorn line.
SPARC_SERVE = "sparc serve"


def server_command(app: str, port: int, *, workers: int = 1) -> list[str]:
    """The command that serves `app` on `port`: `sparc serve` as shipped for SPARC_SERVE, else
    uvicorn with the factory `app` and nothing logged but warnings (the reference apps)."""
    if app == SPARC_SERVE:
        return [
            sys.executable,
            "-m",
            "sparc",
            "serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
    return [
        *(sys.executable, "-m", "uvicorn", app, "--factory", "--port", str(port)),
        *("--workers", str(workers), "--log-level", "warning", "--no-access-log"),
    ]


@contextlib.contextmanager
def server(app: str, env: dict[str, str], *, workers: int = 1) -> Iterator[str]:
    """Serve `app` (SPARC_SERVE or a uvicorn factory path) on a free port; yield its base URL.

    Its log goes to bench/results/<app>.log: the connection-per-request app logs a traceback
    for every request PostgreSQL refuses, `sparc serve` a line per request.
    """
    port = free_port()
    log_dir = REPO_ROOT / "bench" / "results"
    log_dir.mkdir(exist_ok=True)
    name = app.split(":")[-1].replace(" ", "-")
    log = (log_dir / f"{name}.log").open("a")
    process = subprocess.Popen(
        server_command(app, port, workers=workers),
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        stdout=log,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{app} exited with {process.returncode}")
            try:
                httpx.get(f"{base}/auth/me", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def bearer_token(base: str, email: str = "bench@example.org") -> str:
    """Register (if new) and log in a benchmark user through SPARC's own API."""
    credentials = {"email": email, "password": "benchmark password"}
    httpx.post(f"{base}/auth/register", json=credentials, timeout=30)
    response = httpx.post(f"{base}/auth/login", json=credentials, timeout=30)
    response.raise_for_status()
    token: str = response.json()["access_token"]
    return token


@dataclass(frozen=True)
class WrkResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int


def _milliseconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"wrk printed a latency SPARC cannot read: {text!r}")
    value, unit = match.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3.6e6}[unit]


def _percentile_line(output: str, percent: int) -> float:
    match = re.search(rf"^\s+{percent}%\s+(\S+)\s*$", output, re.MULTILINE)
    if match is None:
        raise ValueError(f"wrk printed no {percent}% latency:\n{output}")
    return _milliseconds(match.group(1))


def wrk(
    url: str, *, connections: int, seconds: int, headers: dict[str, str], script: str | None = None
) -> WrkResult:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    if script is not None:
        command += ["-s", script]
    output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return WrkResult(
        requests_per_second=float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        p50_ms=_percentile_line(output, 50),
        p99_ms=_percentile_line(output, 99),
        requests=int(re.search(r"(\d+) requests in", output).group(1)),  # type: ignore[union-attr]
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def app_env(url: str, pool_size: int) -> dict[str, str]:
    """What every benchmarked app reads: SPARC its DATABASE_URL, the others BENCH_DATABASE_URL,
    all the same pool bound."""
    return {"DATABASE_URL": url, "BENCH_DATABASE_URL": url, "DB_POOL_MAX_SIZE": str(pool_size)}


@contextlib.contextmanager
def post_script(body: str, content_type: str) -> Iterator[str]:
    """A wrk Lua script that POSTs `body`; its path, for the block's duration."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(body)}\n"
            f'wrk.headers["Content-Type"] = "{content_type}"\n'
        )
    try:
        yield script.name
    finally:
        os.unlink(script.name)


@contextlib.contextmanager
def probing(url: str, headers: dict[str, str] | None = None) -> Iterator[list[float]]:
    """While inside, a client of its own GETs `url` every 20 ms; yields the milliseconds each
    answer took (filled in as they come)."""
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(headers=headers, timeout=30) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.get(url).raise_for_status()
                latencies.append((time.perf_counter() - started) * 1000)
                stop.wait(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        yield latencies
    finally:
        stop.set()
        prober.join()


def flood_logins(
    base: str,
    body: str,
    content_type: str,
    *,
    probe_url: str,
    probe_headers: dict[str, str] | None = None,
    connections: int,
    seconds: int,
) -> tuple[WrkResult, list[float]]:
    """wrk POSTs `body` to /auth/login while `probing` times GET `probe_url`: wrk's result and
    the probe's milliseconds."""
    with (
        post_script(body, content_type) as script,
        probing(probe_url, probe_headers) as latencies,
    ):
        result = wrk(
            f"{base}/auth/login",
            connections=connections,
            seconds=seconds,
            headers={},
            script=script,
        )
    return result, latencies
