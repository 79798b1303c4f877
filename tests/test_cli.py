"""The `sparc` command as an operator runs it: real processes, real signals."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sparc.migrations import head_revision, upgrade
from sparc.settings import mask_password
from tests.conftest import REPO_ROOT, asyncpg_dsn
from tests.processes import (
    LOG_RECORD_START,
    free_port,
    poll,
    postgres_processes_using,
    run_sparc,
    sparc_env,
    start_serve,
    start_sparc,
    stop,
)


def test_serve_migrates_serves_and_stops_on_sigterm(cli_database: str, tmp_path: Path) -> None:
    # The test servers trust local connections, so any password gets in; it must never show.
    url = with_password(cli_database, "pw-must-not-leak")
    process, base = start_serve(sparc_env(DATABASE_URL=url), cwd=tmp_path)
    try:
        poll(f"{base}/readyz", process=process)
        created = httpx.post(
            f"{base}/auth/register", json={"email": "cli@example.org", "password": "long enough"}
        )
        assert created.status_code == 201
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr
    assert "database pool open" in stderr
    assert "pw-must-not-leak" not in stderr


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    user = user.split(":")[0] or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def test_serve_with_two_workers_shares_nothing_but_the_database(
    cli_database: str, tmp_path: Path
) -> None:
    process, base = start_serve(
        sparc_env(DATABASE_URL=cli_database), "--workers", "2", cwd=tmp_path
    )
    try:
        body = poll(f"{base}/readyz", process=process).json()
        assert body["pool"]["max"] == 10
        assert (body["workers"], body["connection_bound"]) == (2, 20)
        for _ in range(10):
            assert httpx.get(f"{base}/healthz").status_code == 200
        # Whichever worker answers /metrics reports both: their pool bounds add up to 20, and
        # all the /healthz requests are counted.
        deadline = time.monotonic() + 30
        while True:
            samples = {
                (sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
                for sample in family.samples
            }
            healthz = (
                "sparc_http_requests_total",
                (("method", "GET"), ("route", "/healthz"), ("status", "200")),
            )
            if samples.get(("sparc_db_pool_max", ())) == 20 and samples.get(healthz) == 10:
                break
            assert time.monotonic() < deadline, samples.get(("sparc_db_pool_max", ()))
            time.sleep(0.1)
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr
    # Every worker logs as `sparc serve` does, uvicorn's lines too, through the escaping
    # formatter: the supervisor's check opens a pool, then each worker opens its own.
    lines = stderr.splitlines()
    assert sum("sparc.database: database pool open" in line for line in lines) == 3, stderr
    assert any("Z INFO:     uvicorn.error: Started server process" in line for line in lines)
    assert all(LOG_RECORD_START.match(line) or line.startswith("    ") for line in lines), stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_embedded_postgres_starts_and_stops_with_serve(tmp_path: Path, sig: signal.Signals) -> None:
    data_dir = tmp_path / "data"
    process, base = start_serve(sparc_env(SPARC_DATA_DIR=str(data_dir)), cwd=tmp_path)
    try:
        assert poll(f"{base}/readyz", process=process).json()["status"] == "ready"
        assert postgres_processes_using(data_dir)
    finally:
        code, stderr = stop(process, sig)
    assert code == 0, stderr
    assert postgres_processes_using(data_dir) == []
    assert not (data_dir / "postgres" / "postmaster.pid").exists()


def test_unreachable_database_fails_fast_with_one_line(tmp_path: Path) -> None:
    env = sparc_env(
        DATABASE_URL="postgresql://sparc:hunter2@127.0.0.1:9/sparc", DB_CONNECT_TIMEOUT="1"
    )
    started = time.monotonic()
    result = run_sparc("serve", "--port", str(free_port()), env=env, cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert elapsed < 1 + 5
    errors = [line for line in result.stderr.splitlines() if line.startswith("sparc:")]
    assert errors == [errors[0]] and "127.0.0.1:9" in errors[0]
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_migrate_works_from_any_directory(cli_database: str, tmp_path: Path) -> None:
    result = run_sparc("migrate", env=sparc_env(DATABASE_URL=cli_database), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    tables = _tables(cli_database)
    assert {"users", "sessions", "alembic_version"} <= tables


HEAD_TABLES = {
    "users",
    "sessions",
    "login_throttles",
    "auth_events",
    "mail_outbox",
    "account_tokens",
}


def test_alembic_upgrade_and_downgrade_from_the_repo_root(cli_database: str) -> None:
    env = sparc_env(DATABASE_URL=cli_database)
    alembic = [sys.executable, "-m", "alembic"]
    for command, expected in (
        (["upgrade", "head"], HEAD_TABLES),
        (["downgrade", "base"], set()),
        (["upgrade", "head"], HEAD_TABLES),
    ):
        result = subprocess.run(
            [*alembic, *command],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert _tables(cli_database) - {"alembic_version"} == expected


def test_with_migrate_off_serve_refuses_a_fresh_database_until_sparc_migrate_has_run(
    cli_database: str, tmp_path: Path
) -> None:
    env = sparc_env(DATABASE_URL=cli_database, SPARC_MIGRATE="off")
    refused = run_sparc("serve", "--port", str(free_port()), env=env, cwd=tmp_path)
    assert refused.returncode == 1
    assert _errors(refused) == [
        f"sparc: the schema of {mask_password(cli_database)} has no revision (never migrated), "
        f"behind this release's {head_revision()}: run `sparc migrate` first (SPARC_MIGRATE=off)"
    ]
    assert _tables(cli_database) == set()  # serve did not migrate
    migrated = run_sparc("migrate", env=env, cwd=tmp_path)  # the release step of its own
    assert migrated.returncode == 0, migrated.stderr
    process, base = start_serve(env, cwd=tmp_path)
    try:
        schema = poll(f"{base}/readyz", process=process).json()["schema"]
        assert schema == {"revision": head_revision(), "head": head_revision()}
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr
    assert "Running upgrade" not in stderr


def test_with_migrate_off_serve_refuses_a_schema_one_revision_behind(
    cli_database: str, tmp_path: Path
) -> None:
    upgrade(cli_database, "0001")
    env = sparc_env(DATABASE_URL=cli_database, SPARC_MIGRATE="off")
    refused = run_sparc("serve", "--port", str(free_port()), env=env, cwd=tmp_path)
    assert refused.returncode == 1
    [error] = _errors(refused)
    assert f"is at revision 0001, behind this release's {head_revision()}" in error
    assert "run `sparc migrate` first" in error
    assert "Traceback" not in refused.stderr


def test_with_migrate_off_serve_warns_about_a_schema_a_newer_release_migrated_and_serves(
    cli_database: str, tmp_path: Path
) -> None:
    upgrade(cli_database)
    _execute(cli_database, "UPDATE alembic_version SET version_num = 'from_a_newer_release'")
    env = sparc_env(DATABASE_URL=cli_database, SPARC_MIGRATE="off")
    process, base = start_serve(env, cwd=tmp_path)
    try:
        schema = poll(f"{base}/readyz", process=process).json()["schema"]
        assert schema == {"revision": "from_a_newer_release", "head": head_revision()}
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr
    [warning] = [line for line in stderr.splitlines() if "Z WARNING:  " in line]
    assert "at revision from_a_newer_release, which this release" in warning
    assert "a newer release has migrated it; serving on" in warning


def _errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("sparc:")]


def _tables(url: str) -> set[str]:
    rows = _execute(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row["tablename"] for row in rows}


def _execute(url: str, sql: str) -> list[asyncpg.Record]:
    import anyio

    async def run() -> list[asyncpg.Record]:
        connection = await asyncpg.connect(asyncpg_dsn(url))
        try:
            return await connection.fetch(sql)
        finally:
            await connection.close()

    return anyio.run(run)


@pytest.mark.faults
def test_serve_refuses_pools_that_cannot_fit_in_max_connections(
    cli_database: str, tmp_path: Path
) -> None:
    env = sparc_env(DATABASE_URL=cli_database, DB_POOL_MAX_SIZE="60")
    result = run_sparc(
        "serve", "--workers", "2", "--port", str(free_port()), env=env, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("sparc:")]
    assert len(errors) == 1, result.stderr
    assert "need 120 connections" in errors[0]
    assert "max_connections=100" in errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.faults
def test_the_budget_check_can_be_turned_off(cli_database: str, tmp_path: Path) -> None:
    env = sparc_env(
        DATABASE_URL=cli_database, DB_POOL_MAX_SIZE="60", DB_CONNECTION_BUDGET_CHECK="false"
    )
    process, base = start_serve(env, "--workers", "2", cwd=tmp_path)
    try:
        assert poll(f"{base}/readyz", process=process).json()["connection_bound"] == 120
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr


def test_version_comes_from_the_package_metadata() -> None:
    import importlib.metadata

    result = run_sparc("--version", env=sparc_env())
    assert result.returncode == 0
    assert result.stdout == f"sparc {importlib.metadata.version('sparc')}\n"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_port_0_binds_a_free_port_and_logs_the_address_once_ready(
    cli_database: str, tmp_path: Path, workers: str
) -> None:
    process = start_sparc(
        "serve",
        "--port",
        "0",
        "--workers",
        workers,
        env=sparc_env(DATABASE_URL=cli_database),
        cwd=tmp_path,
    )
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 60
        for line in process.stderr:  # the log, line by line, until the ready line
            if "SPARC ready at " in line:
                address = line.split("SPARC ready at ", 1)[1].strip()
                break
            assert time.monotonic() < deadline and process.poll() is None, line
        else:
            raise AssertionError("sparc serve never logged its address")
        assert re.fullmatch(r"http://127\.0\.0\.1:[0-9]+", address)
        assert not address.endswith(":0")
        # Ready means ready: the address answers at once.
        assert httpx.get(f"{address}/readyz").json()["status"] == "ready"
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr
