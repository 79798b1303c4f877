"""Small HTTP helpers shared by the API tests."""

from __future__ import annotations

from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sparc.database import PoolTimeout

PASSWORD = "correct horse battery"


async def register(http: httpx.AsyncClient, email: str, password: str = PASSWORD) -> httpx.Response:
    return await http.post("/auth/register", json={"email": email, "password": password})


async def login(
    http: httpx.AsyncClient, email: str, password: str = PASSWORD, **headers: str
) -> httpx.Response:
    return await http.post(
        "/auth/login", json={"email": email, "password": password}, headers=headers
    )


async def token_for(http: httpx.AsyncClient, email: str, password: str = PASSWORD) -> str:
    """Register `email` (if new) and log in; the bearer token."""
    created = await register(http, email, password)
    assert created.status_code in (201, 409)
    response = await login(http, email, password)
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


async def change_password(
    http: httpx.AsyncClient, token: str, new_password: str, current_password: str = PASSWORD
) -> httpx.Response:
    return await http.post(
        "/auth/password",
        json={"current_password": current_password, "new_password": new_password},
        headers=bearer(token),
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"] and body["detail"]
    # Every problem of SPARC's app names the request's id, as its X-Request-ID header does (an
    # app of the database layer alone gives requests no id).
    if "x-request-id" in response.headers:
        assert body["request_id"] == response.headers["x-request-id"], response.text
    return body


def without_request_id(problem: dict[str, Any]) -> dict[str, Any]:
    """A problem document less its request id, which differs between any two answers."""
    return {key: value for key, value in problem.items() if key != "request_id"}


def add_failing_routes(app: Starlette) -> None:
    """`/auth/busy`, answered 503 by the database middleware (no connection in time), and
    `/boom`, which raises: a 500 from the framework's error handler."""

    async def busy(request: Request) -> Response:
        raise PoolTimeout("no connection")

    async def boom(request: Request) -> Response:
        raise RuntimeError("boom")

    app.router.routes += [Route("/auth/busy", busy), Route("/boom", boom)]
