"""The benchmark's peer (bench/fastapi_users_app.py) answers what it is measured on: login,
then GET /users/me with the bearer token. Needs the bench extra; skipped without it."""

from __future__ import annotations

import asyncpg
import pytest

pytest.importorskip("fastapi_users", reason="the bench extra is not installed")

from bench import fastapi_users_app
from tests.conftest import serving

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("hash_setting", "argon2"), [("default", "m=65536,t=3,p=4"), ("sparc", "m=19456,t=2,p=1")]
)
async def test_the_peer_logs_in_and_answers_users_me(
    database_url: str,
    admin: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    hash_setting: str,
    argon2: str,
) -> None:
    monkeypatch.setenv("BENCH_DATABASE_URL", database_url)
    monkeypatch.setenv("BENCH_PEER_HASH", hash_setting)
    credentials = {"username": "peer@example.org", "password": "benchmark password"}
    async with serving(fastapi_users_app.create_app()) as http:
        registered = await http.post(
            "/auth/register",
            json={"email": credentials["username"], "password": credentials["password"]},
        )
        assert registered.status_code == 201, registered.text
        login = await http.post("/auth/login", data=credentials)
        assert login.status_code == 200, login.text
        token = login.json()["access_token"]
        me = await http.get(fastapi_users_app.ME_PATH, headers={"Authorization": f"Bearer {token}"})
        refused = await http.get(fastapi_users_app.ME_PATH)
    assert me.status_code == 200
    assert me.json()["email"] == "peer@example.org"
    assert refused.status_code == 401
    # The database token strategy: the token is a row of the access token table.
    assert await admin.fetchval("SELECT count(*) FROM accesstoken WHERE token = $1", token) == 1
    stored = await admin.fetchval('SELECT hashed_password FROM "user"')
    assert stored.startswith(f"$argon2id$v=19${argon2}$")
