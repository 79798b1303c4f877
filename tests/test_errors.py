"""One error format: every 4xx and 5xx answer is an RFC 9457 problem document."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sparc.app import create_app
from sparc.settings import Settings
from tests.helpers import assert_problem

pytestmark = pytest.mark.anyio


async def test_unknown_path_is_a_404_problem(http: httpx.AsyncClient) -> None:
    assert_problem(await http.get("/no/such/thing"), 404)


async def test_wrong_method_is_a_405_problem(http: httpx.AsyncClient) -> None:
    response = await http.get("/auth/login")
    assert_problem(response, 405)
    assert "POST" in response.headers["allow"]


async def test_unhandled_error_is_a_500_problem_that_leaks_nothing(settings: Settings) -> None:
    async def boom(request: Request) -> Response:
        raise RuntimeError("secret internal detail")

    app = create_app(settings)
    app.router.routes.append(Route("/boom", boom))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            response = await http.get("/boom")
    body = assert_problem(response, 500)
    assert "secret" not in response.text
    assert body["detail"] == "The server failed to handle this request."


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b"{not json", "application/json", 400),
        (b"\xff\xfe\x00", "application/json", 400),
        (b"", "application/json", 400),
        (b'{"email": "a@b.c", "password": "x"', "application/json", 400),
        (b'{"email": "a@example.org", "password": "long enough"}', "text/plain", 415),
        (b'{"email": "a@example.org", "password": "long enough"}', "", 415),
        (b"email=a&password=b", "application/x-www-form-urlencoded", 415),
        (b"null", "application/json", 422),
        (b"[]", "application/json", 422),
        (b'"a string"', "application/json", 422),
        (b"12", "application/json", 422),
        (b"{}", "application/json", 422),
        (b'{"email": null, "password": null}', "application/json", 422),
        (b'{"email": ["a@example.org"], "password": "long enough"}', "application/json", 422),
        (b'{"email": "a@example.org", "password": 123456789}', "application/json", 422),
        (b'{"email": {"$ne": 1}, "password": "long enough"}', "application/json", 422),
        (b'{"email": "a@example.org", "password": "' + b"x" * 300 + b'"}', "application/json", 422),
    ],
)
@pytest.mark.parametrize("path", ["/auth/register", "/auth/login"])
async def test_malformed_bodies_are_4xx_never_500(
    http: httpx.AsyncClient, path: str, content: bytes, content_type: str, status: int
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = await http.post(path, content=content, headers=headers)
    body = assert_problem(response, status)
    if status == 422 and "errors" in body:
        assert all({"field", "message"} == set(error) for error in body["errors"])


async def test_422_lists_every_bad_field(http: httpx.AsyncClient) -> None:
    response = await http.post("/auth/register", json={"email": "nope", "password": "short"})
    body = assert_problem(response, 422)
    assert sorted(error["field"] for error in body["errors"]) == ["email", "password"]


async def test_oversized_body_is_413_without_reading_it_whole(http: httpx.AsyncClient) -> None:
    pulled = 0

    async def one_megabyte() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(64):
            pulled += 1
            yield b" " * 16384

    response = await http.post(
        "/auth/register", content=one_megabyte(), headers={"content-type": "application/json"}
    )
    assert_problem(response, 413)
    assert pulled <= 6  # 64 KiB and a chunk, not the whole megabyte


async def test_declared_oversized_body_is_refused_before_reading(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/auth/login", content=b"{}" + b" " * 70_000, headers={"content-type": "application/json"}
    )
    assert_problem(response, 413)


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token abc",
        "Bearer a b",
        "bearer" + " x" * 3,
        "Bearer " + "x" * 300,
    ],
)
async def test_malformed_authorization_is_401_with_a_bearer_challenge(
    http: httpx.AsyncClient, authorization: str
) -> None:
    response = await http.get("/auth/me", headers={"Authorization": authorization})
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"
