"""`sparc users` as an operator runs it: real processes beside a real `sparc serve`."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest

from sparc import admin_cli
from tests.conftest import asyncpg_dsn
from tests.helpers import PASSWORD
from tests.processes import poll, run_sparc, serving_ready, sparc_env, start_serve, stop


@pytest.fixture
def service(cli_database: str, tmp_path: Path) -> Iterator[str]:
    """`sparc serve` on a fresh database (it migrates it); its base URL."""
    with serving_ready(sparc_env(DATABASE_URL=cli_database), cwd=tmp_path) as base:
        yield base


def users(
    database_url: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return run_sparc("users", *args, env=sparc_env(DATABASE_URL=database_url), stdin=stdin)


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command writes (and nothing else: no traceback, no log)."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparc: users "), result.stderr
    return lines[0]


def login(base: str, email: str, password: str = PASSWORD) -> httpx.Response:
    return httpx.post(f"{base}/auth/login", json={"email": email, "password": password})


def token_of(base: str, email: str) -> dict[str, str]:
    response = login(base, email)
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def cli_events(database_url: str) -> list[asyncpg.Record]:
    async def fetch() -> list[asyncpg.Record]:
        connection = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            return await connection.fetch(
                "SELECT type, user_id, actor_id, ip, user_agent FROM auth_events"
                " WHERE via = 'cli' ORDER BY id"
            )
        finally:
            await connection.close()

    return anyio.run(fetch)


def test_the_first_admin_is_made_on_the_cli_and_users_are_disabled_from_it_at_once(
    service: str, cli_database: str
) -> None:
    created = users(
        cli_database,
        "create",
        "root@example.org",
        "--admin",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("created admin root@example.org (")
    root = token_of(service, "root@example.org")
    body = {"email": "bob@example.org", "password": PASSWORD}
    assert httpx.post(f"{service}/auth/register", json=body).status_code == 201
    bob = token_of(service, "bob@example.org")

    listed = httpx.get(f"{service}/admin/users", headers=root).json()["users"]
    assert {user["email"] for user in listed} == {"root@example.org", "bob@example.org"}
    assert (
        users(cli_database, "list", "--search", "BOB")
        .stdout.splitlines()[1]
        .endswith("  no     no        bob@example.org")
    )

    disabled = users(cli_database, "disable", "bob@example.org")
    assert disabled.stdout == "disabled bob@example.org until enabled; 1 sessions revoked\n"
    assert httpx.get(f"{service}/auth/me", headers=bob).status_code == 401  # at once
    assert login(service, "bob@example.org").status_code == 403
    assert "disabled: yes" in users(cli_database, "show", "bob@example.org").stdout.splitlines()

    assert users(cli_database, "enable", "bob@example.org").returncode == 0
    assert login(service, "bob@example.org").status_code == 200
    assert users(cli_database, "promote", "bob@example.org").returncode == 0
    assert users(cli_database, "demote", "root@example.org").returncode == 0
    assert httpx.get(f"{service}/admin/users", headers=root).status_code == 403
    assert (
        httpx.get(
            f"{service}/admin/users", headers=token_of(service, "bob@example.org")
        ).status_code
        == 200
    )
    assert users(cli_database, "delete", "bob@example.org").stdout == "erased bob@example.org\n"
    assert login(service, "bob@example.org").status_code == 401

    events = cli_events(cli_database)
    assert [event["type"] for event in events] == [
        "admin_user_created",
        "admin_user_disabled",
        "admin_user_enabled",
        "admin_user_promoted",
        "admin_user_demoted",
        "admin_user_erased",
    ]
    # From the host: no admin account, no address, no user agent.
    assert {(e["actor_id"], e["ip"], e["user_agent"]) for e in events} == {(None, None, None)}


def test_each_failure_is_one_line_with_its_exit_code(service: str, cli_database: str) -> None:
    assert (
        users(
            cli_database, "create", "ada@example.org", "--password-stdin", stdin=PASSWORD
        ).returncode
        == 0
    )
    failures = [
        (("show", "nobody@example.org"), None, admin_cli.NO_SUCH_ACCOUNT, "no account has"),
        (("delete", "nobody@example.org"), None, admin_cli.NO_SUCH_ACCOUNT, "no account has"),
        (
            ("create", "ADA@example.org", "--password-stdin"),
            PASSWORD,
            admin_cli.ACCOUNT_EXISTS,
            "exists",
        ),
        (
            ("create", "not-an-email", "--password-stdin"),
            PASSWORD,
            admin_cli.BAD_INPUT,
            "email is not an email",
        ),
        (
            ("create", "x@example.org", "--password-stdin"),
            "password",
            admin_cli.BAD_INPUT,
            "password is too common",
        ),
        (("create", "x@example.org"), None, admin_cli.BAD_INPUT, "pass --password-stdin"),
        (
            ("disable", "ada@example.org", "--until", "yesterday"),
            None,
            admin_cli.BAD_INPUT,
            "--until",
        ),
        (
            ("disable", "ada@example.org", "--until", "2001-01-01T00:00:00Z"),
            None,
            admin_cli.BAD_INPUT,
            "not in the future",
        ),
    ]
    for args, stdin, code, message in failures:
        result = users(cli_database, *args, stdin=stdin)
        assert result.returncode == code, (args, result.stderr)
        assert message in one_error(result), args
        assert result.stdout == ""
    # A password is never an argument.
    refused = users(cli_database, "create", "x@example.org", "--password", PASSWORD)
    assert refused.returncode == admin_cli.BAD_INPUT
    assert login(service, "x@example.org").status_code == 401
    assert users(cli_database, "disable", "ada@example.org", "--until", "2h").returncode == 0
    assert login(service, "ada@example.org").status_code == 403


def test_a_database_never_migrated_is_refused_with_a_pointer_to_sparc_migrate(
    cli_database: str,
) -> None:
    result = users(cli_database, "list")
    assert result.returncode == admin_cli.DATABASE_FAILED
    assert "run `sparc migrate` first" in one_error(result)


def test_users_joins_the_embedded_postgresql_of_a_running_serve(tmp_path: Path) -> None:
    env = sparc_env(SPARC_DATA_DIR=str(tmp_path / "data"))
    process, base = start_serve(env, cwd=tmp_path)
    try:
        poll(f"{base}/readyz", process=process)
        created = run_sparc(
            "users",
            "create",
            "first@example.org",
            "--admin",
            "--password-stdin",
            env=env,
            cwd=tmp_path,
            stdin=PASSWORD,
        )
        assert created.returncode == 0, created.stderr
        admin = token_of(base, "first@example.org")
        shown = httpx.get(f"{base}/admin/users", headers=admin).json()["users"]
        assert [user["email"] for user in shown] == ["first@example.org"]
        # The server stays up for `sparc serve` after the command left it.
        assert httpx.get(f"{base}/readyz").status_code == 200
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr


def test_an_account_made_on_the_cli_counts_as_verified(cli_database: str, tmp_path: Path) -> None:
    # With verified addresses required, the first admin must still be able to log in: the
    # operator vouched for the address, and no verification mail is sent from the host.
    env = sparc_env(DATABASE_URL=cli_database, SPARC_REQUIRE_VERIFIED_EMAIL="true")
    process, base = start_serve(env, cwd=tmp_path)
    try:
        poll(f"{base}/readyz", process=process)
        created = users(
            cli_database, "create", "root@example.org", "--password-stdin", stdin=PASSWORD
        )
        assert created.returncode == 0, created.stderr
        assert login(base, "root@example.org").status_code == 200
        shown = users(cli_database, "show", "root@example.org").stdout.splitlines()
        assert "email_verified_at: -" not in shown
        assert any(line.startswith("email_verified_at: 20") for line in shown)
        body = {"email": "bob@example.org", "password": PASSWORD}
        assert httpx.post(f"{base}/auth/register", json=body).status_code == 201
        assert login(base, "bob@example.org").status_code == 403  # registered: not yet verified
    finally:
        stop(process)
