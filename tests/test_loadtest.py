"""`sparc loadtest` against a real `sparc serve`: report fields, verdicts, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest

from tests.conftest import asyncpg_dsn
from tests.processes import poll, run_sparc, sparc_env, start_serve, stop

REPORT_KEYS = {
    "url",
    "concurrency",
    "duration_seconds",
    "login_ratio",
    "requests",
    "requests_per_second",
    "latency_ms",
    "status_counts",
    "transport_errors",
    "unexpected_5xx",
    "peak_connections",
    "connection_bound",
    "connection_samples",
    "bound_exceeded",
    "passed",
}


@pytest.fixture
def service(cli_database: str, tmp_path: Path) -> Iterator[str]:
    """`sparc serve` with a pool of 3 on a fresh database; its base URL."""
    env = sparc_env(DATABASE_URL=cli_database, DB_POOL_MAX_SIZE="3", DB_POOL_TIMEOUT="10")
    process, base = start_serve(env, cwd=tmp_path)
    try:
        poll(f"{base}/readyz", process=process)
        yield base
    finally:
        stop(process)


def loadtest(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sparc", "loadtest", *args],
        env=sparc_env(DATABASE_URL=database_url),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_json_report_under_overload_stays_within_the_bound(service: str, cli_database: str) -> None:
    result = loadtest(
        cli_database,
        "--url",
        service,
        "--concurrency",
        "60",
        "--duration",
        "2",
        "--login-ratio",
        "0.02",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout is the JSON object and nothing else
    assert set(report) == REPORT_KEYS
    assert report["requests"] > 0
    assert report["requests"] == sum(report["status_counts"].values())
    assert set(report["latency_ms"]) == {"p50", "p95", "p99"}
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["connection_bound"] == 3
    assert 1 <= report["peak_connections"] <= 3
    assert report["connection_samples"] >= 10
    assert report["passed"] and not report["bound_exceeded"]


def test_human_report_names_the_verdict(service: str, cli_database: str) -> None:
    result = loadtest(cli_database, "--url", service, "--concurrency", "5", "--duration", "1")
    assert result.returncode == 0, result.stderr
    assert "passed" in result.stdout
    assert "of a bound of 3" in result.stdout


def test_connections_beyond_the_bound_fail_the_run(service: str, cli_database: str) -> None:
    async def hold_connections() -> None:
        # Other clients of the same database count: the server sees more than SPARC's bound.
        extra = [await asyncpg.connect(asyncpg_dsn(cli_database)) for _ in range(5)]
        try:
            result = await anyio.to_thread.run_sync(
                lambda: loadtest(cli_database, "--url", service, "--duration", "1", "--json")
            )
        finally:
            for connection in extra:
                await connection.close()
        assert result.returncode == 1
        report = json.loads(result.stdout)
        assert report["bound_exceeded"] and report["peak_connections"] >= 5

    anyio.run(hold_connections)


def test_server_errors_fail_the_run(service: str, cli_database: str) -> None:
    async def break_sessions() -> None:
        connection = await asyncpg.connect(asyncpg_dsn(cli_database))
        try:
            await connection.execute("ALTER TABLE sessions RENAME COLUMN last_seen_at TO gone")
        finally:
            await connection.close()

    result = loadtest(cli_database, "--url", service, "--duration", "1", "--json")
    assert result.returncode == 0  # healthy first
    anyio.run(break_sessions)
    result = loadtest(cli_database, "--url", service, "--duration", "1", "--json")
    assert result.returncode == 1
    assert (
        "POST /auth/login answered 500" in result.stderr
        or json.loads(result.stdout)["unexpected_5xx"] > 0
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "ftp://x"], "must be an http"),
        (["--url", "http://127.0.0.1:9"], "answered nothing"),
    ],
)
def test_unusable_targets_fail_with_one_line(
    cli_database: str, args: list[str], message: str
) -> None:
    result = loadtest(cli_database, *args, "--duration", "1")
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_loadtest_needs_the_database_when_no_embedded_postgresql_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sparc", "loadtest", "--url", "http://127.0.0.1:9"],
        env=sparc_env(SPARC_DATA_DIR=str(tmp_path / "nothing-runs-here")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no embedded PostgreSQL runs in" in result.stderr
    assert "--database-url" in result.stderr
    assert not (tmp_path / "nothing-runs-here" / "postgres").exists()  # none was started


def test_loadtest_of_the_quick_start_joins_its_embedded_postgresql(tmp_path: Path) -> None:
    # The quick start: `sparc serve` with no DATABASE_URL; the load test is given only its URL.
    env = sparc_env(SPARC_DATA_DIR=str(tmp_path / "data"), DB_POOL_MAX_SIZE="3")
    process, base = start_serve(env, cwd=tmp_path)
    try:
        poll(f"{base}/readyz", process=process)
        args = ("--url", base, "--concurrency", "10", "--duration", "1", "--json")
        result = run_sparc("loadtest", *args, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["passed"] and report["requests"] > 0
        # It counted the service's own connections on the embedded server.
        assert 1 <= report["peak_connections"] <= report["connection_bound"] == 3
        assert httpx.get(f"{base}/readyz").status_code == 200  # and left it running
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr
