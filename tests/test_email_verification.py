"""Email verification through the mail a real SMTP server (aiosmtpd) receives, the resend
cooldown, and SPARC_REQUIRE_VERIFIED_EMAIL."""

from __future__ import annotations

from dataclasses import replace

import asyncpg
import httpx
import pytest

from sparc.app import create_app
from sparc.email_verification import BAD_TOKEN, QUEUED, RESEND_COOLDOWN
from sparc.settings import Settings
from tests.conftest import poll_until, serving
from tests.helpers import PASSWORD, assert_problem, bearer, login, register, token_for
from tests.smtp import SmtpServer, link_in, token_in, with_subject

pytestmark = pytest.mark.anyio

VERIFY = "Confirm your email address"


async def verification_token(smtp: SmtpServer, count: int = 1) -> str:
    """The token of the `count`-th verification mail, once it has arrived."""
    await poll_until(lambda: len(with_subject(smtp, VERIFY)) >= count)
    return token_in(with_subject(smtp, VERIFY)[count - 1])


async def verify(http: httpx.AsyncClient, token: str) -> httpx.Response:
    return await http.post("/auth/verify-email", json={"token": token})


async def resend(http: httpx.AsyncClient, session: str) -> httpx.Response:
    return await http.post("/auth/verify-email/resend", headers=bearer(session))


async def me(http: httpx.AsyncClient, session: str) -> dict[str, object]:
    response = await http.get("/auth/me", headers=bearer(session))
    assert response.status_code == 200
    body: dict[str, object] = response.json()
    return body


async def test_registering_mails_a_token_that_verifies_the_address(
    mail_http: httpx.AsyncClient, smtp: SmtpServer, admin: asyncpg.Connection
) -> None:
    session = await token_for(mail_http, "ada@example.org")
    assert (await me(mail_http, session))["email_verified"] is False
    token = await verification_token(smtp)
    assert link_in(with_subject(smtp, VERIFY)[0]).startswith(
        "http://localhost:8000/verify-email?token="
    )
    assert (await verify(mail_http, token)).status_code == 204
    assert (await me(mail_http, session))["email_verified"] is True
    types = [row["type"] for row in await admin.fetch("SELECT type FROM auth_events")]
    assert "email_verified" in types


async def test_a_verification_token_works_once(
    mail_http: httpx.AsyncClient, smtp: SmtpServer
) -> None:
    await register(mail_http, "once@example.org")
    token = await verification_token(smtp)
    assert (await verify(mail_http, token)).status_code == 204
    assert assert_problem(await verify(mail_http, token), 400)["detail"] == BAD_TOKEN


async def test_an_expired_verification_token_is_refused(
    mail_http: httpx.AsyncClient, smtp: SmtpServer, admin: asyncpg.Connection
) -> None:
    session = await token_for(mail_http, "late@example.org")
    token = await verification_token(smtp)
    await admin.execute("UPDATE account_tokens SET expires_at = now() - interval '1 second'")
    assert assert_problem(await verify(mail_http, token), 400)["detail"] == BAD_TOKEN
    assert (await me(mail_http, session))["email_verified"] is False


async def test_the_verification_lifetime_is_sparc_email_verify_ttl(
    mail_settings: Settings, admin: asyncpg.Connection
) -> None:
    async with serving(create_app(replace(mail_settings, email_verify_ttl=7200))) as http:
        await register(http, "ttl@example.org")
    lifetime = await admin.fetchval(
        "SELECT extract(epoch FROM expires_at - created_at) FROM account_tokens"
    )
    assert lifetime == 7200


async def test_resend_waits_out_a_cooldown_then_replaces_the_token(
    mail_http: httpx.AsyncClient, smtp: SmtpServer, admin: asyncpg.Connection
) -> None:
    session = await token_for(mail_http, "again@example.org")
    first = await verification_token(smtp)
    too_soon = await resend(mail_http, session)
    assert_problem(too_soon, 429)
    assert 1 <= int(too_soon.headers["Retry-After"]) <= RESEND_COOLDOWN
    await admin.execute("UPDATE mail_outbox SET created_at = created_at - interval '61 seconds'")
    queued = await resend(mail_http, session)
    assert queued.status_code == 202 and queued.json() == QUEUED
    second = await verification_token(smtp, count=2)
    assert_problem(await verify(mail_http, first), 400)
    assert (await verify(mail_http, second)).status_code == 204
    assert_problem(await resend(mail_http, session), 409)  # verified: nothing to resend


async def test_resend_needs_a_bearer_token(mail_http: httpx.AsyncClient) -> None:
    assert_problem(await mail_http.post("/auth/verify-email/resend"), 401)


async def test_with_require_verified_email_an_unverified_login_is_refused(
    mail_settings: Settings, smtp: SmtpServer
) -> None:
    app = create_app(replace(mail_settings, require_verified_email=True))
    async with serving(app, check_openapi=True) as http:
        await register(http, "strict@example.org")
        refused = assert_problem(await login(http, "strict@example.org"), 403)
        assert refused["detail"].startswith("Verify your email first")
        # A wrong password still gets the 401 everybody gets: the 403 tells nothing to guessers.
        assert_problem(await login(http, "strict@example.org", "wrong password"), 401)
        assert (await verify(http, await verification_token(smtp))).status_code == 204
        assert (await login(http, "strict@example.org", PASSWORD)).status_code == 200


async def test_without_require_verified_email_an_unverified_login_works(
    mail_http: httpx.AsyncClient,
) -> None:
    await register(mail_http, "relaxed@example.org")
    assert (await login(mail_http, "relaxed@example.org")).status_code == 200


async def test_deleting_an_account_deletes_its_mail_and_tokens(
    mail_http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    await register(mail_http, "erased@example.org")
    await mail_http.post("/auth/password-reset", json={"email": "erased@example.org"})
    assert await admin.fetchval("SELECT count(*) FROM mail_outbox") == 2
    assert await admin.fetchval("SELECT count(*) FROM account_tokens") == 2
    await admin.execute("DELETE FROM users")
    assert await admin.fetchval("SELECT count(*) FROM mail_outbox") == 0
    assert await admin.fetchval("SELECT count(*) FROM account_tokens") == 0
