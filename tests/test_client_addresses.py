"""Client addresses over real HTTP: trusted proxies, and throttling that cannot be aimed.

One `sparc serve` for the module, trusting 127.0.0.1 (the "load balancer") and 198.51.100.0/24
(a second proxy tier). Clients are told apart by the source address of their connection (the
loopback range has many: httpx binds 127.0.0.2, 127.0.0.3, ...) or, through the trusted proxy,
by the X-Forwarded-For entry it appends.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import empty_database
from tests.helpers import PASSWORD, assert_problem
from tests.processes import free_port, poll, sparc_env, start_serve, stop

pytestmark = pytest.mark.anyio

MAX_FAILURES = 3  # per (email, address)
ACCOUNT_MAX_FAILURES = 6  # per account, all addresses
REGISTRATION_IP_MAX = 4


@pytest.fixture(scope="module")
def service(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with empty_database(server_url, "sparc_addresses") as url:
        env = sparc_env(
            DATABASE_URL=url,
            SPARC_TRUSTED_PROXIES="127.0.0.1, 198.51.100.0/24",
            SPARC_LOGIN_MAX_FAILURES=str(MAX_FAILURES),
            SPARC_LOGIN_ACCOUNT_MAX_FAILURES=str(ACCOUNT_MAX_FAILURES),
            SPARC_REGISTRATION_IP_MAX=str(REGISTRATION_IP_MAX),
        )
        process, base = start_serve(env, cwd=tmp_path_factory.mktemp("addresses"))
        try:
            poll(f"{base}/readyz", process=process)
            yield base
        finally:
            stop(process)


def client(base: str, source: str = "127.0.0.1") -> httpx.AsyncClient:
    """An HTTP client whose connections come from `source`."""
    transport = httpx.AsyncHTTPTransport(local_address=source)
    return httpx.AsyncClient(base_url=base, transport=transport, timeout=30)


def forwarded(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


def new_email() -> str:
    return f"a-{uuid.uuid4().hex[:10]}@example.org"


async def sign_up(http: httpx.AsyncClient, email: str, via: str) -> str:
    """Register `email` and log in from `via` (behind the proxy); the bearer token."""
    body = {"email": email, "password": PASSWORD}
    assert (await http.post("/auth/register", json=body, headers=forwarded(via))).status_code == 201
    response = await http.post("/auth/login", json=body, headers=forwarded(via))
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


async def session_ip(http: httpx.AsyncClient, token: str) -> str:
    response = await http.get("/auth/sessions", headers={"Authorization": f"Bearer {token}"})
    (session,) = response.json()["sessions"]
    return str(session["ip"])


async def attempt(http: httpx.AsyncClient, email: str, password: str, via: str) -> int:
    body = {"email": email, "password": password}
    return (await http.post("/auth/login", json=body, headers=forwarded(via))).status_code


async def test_from_a_trusted_proxy_the_client_is_the_rightmost_untrusted_entry(
    service: str,
) -> None:
    async with client(service) as http:
        # 198.51.100.7 is a trusted proxy tier; 203.0.113.9 is the client it served.
        token = await sign_up(http, new_email(), "203.0.113.9, 198.51.100.7")
        assert await session_ip(http, token) == "203.0.113.9"
        events = await http.get("/auth/events", headers={"Authorization": f"Bearer {token}"})
        assert {event["ip"] for event in events.json()["events"]} == {"203.0.113.9"}


async def test_entries_the_client_wrote_itself_are_not_believed(service: str) -> None:
    async with client(service) as http:
        # The client sent "10.9.9.9"; the proxy appended the address it really came from.
        token = await sign_up(http, new_email(), "10.9.9.9, 203.0.113.10")
        assert await session_ip(http, token) == "203.0.113.10"


async def test_from_any_other_peer_forwarded_for_is_ignored(service: str) -> None:
    async with client(service, source="127.0.0.2") as http:
        token = await sign_up(http, new_email(), "203.0.113.11")
        assert await session_ip(http, token) == "127.0.0.2"


async def test_an_attacker_cannot_lock_a_victim_out(service: str) -> None:
    victim = new_email()
    async with client(service) as http:
        await sign_up(http, victim, "203.0.113.20")
        for _ in range(MAX_FAILURES):
            assert await attempt(http, victim, "wrong password", "203.0.113.66") == 401
        # The attacker's address is locked for this account...
        locked = await http.post(
            "/auth/login",
            json={"email": victim, "password": PASSWORD},
            headers=forwarded("203.0.113.66"),
        )
        assert_problem(locked, 429)
        assert int(locked.headers["retry-after"]) >= 1
        # ...the victim, from their own address, is not.
        assert await attempt(http, victim, PASSWORD, "203.0.113.20") == 200


async def test_guessing_spread_over_many_addresses_meets_the_account_ceiling(
    service: str,
) -> None:
    target = new_email()
    async with client(service) as http:
        await sign_up(http, target, "203.0.113.30")
        for n in range(ACCOUNT_MAX_FAILURES):
            assert await attempt(http, target, "wrong password", f"192.0.2.{n + 1}") == 401
        # Now the account is slowed for every address, its owner's included.
        assert await attempt(http, target, PASSWORD, "203.0.113.30") == 429


async def test_registrations_are_throttled_per_client_address(service: str) -> None:
    async with client(service) as http:
        statuses = []
        for _ in range(REGISTRATION_IP_MAX + 1):
            body = {"email": new_email(), "password": PASSWORD}
            response = await http.post(
                "/auth/register", json=body, headers=forwarded("203.0.113.40")
            )
            statuses.append(response.status_code)
        assert statuses == [201] * REGISTRATION_IP_MAX + [429]
        assert response.headers["retry-after"]
        body = {"email": new_email(), "password": PASSWORD}
        other = await http.post("/auth/register", json=body, headers=forwarded("203.0.113.41"))
        assert other.status_code == 201


def test_the_server_log_names_the_client_not_the_proxy(cli_database: str, tmp_path: Path) -> None:
    env = sparc_env(DATABASE_URL=cli_database, SPARC_TRUSTED_PROXIES="127.0.0.1")
    port = free_port()
    # uvicorn writes its access log to standard output.
    process = subprocess.Popen(
        [sys.executable, "-m", "sparc", "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        poll(f"{base}/healthz", process=process)
        httpx.get(f"{base}/healthz", headers=forwarded("203.0.113.99"))
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=30)
    assert "sparc.access: 203.0.113.99 GET /healthz 200" in stdout, stdout[-2000:]
