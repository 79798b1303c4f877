"""Request ids: a sane X-Request-ID is kept, any other replaced; echoed on every answer, in
every problem document and in every log line of the request."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sparc.app import create_app
from sparc.logs import JsonFormatter
from sparc.openapi import DOCUMENT
from sparc.request_ids import REQUEST_ID_MAX_LENGTH, current_request_id, incoming_request_id
from sparc.settings import Settings
from tests.conftest import serving
from tests.helpers import add_failing_routes, assert_problem, bearer, token_for

pytestmark = pytest.mark.anyio

GENERATED = re.compile("[0-9a-f]{32}")


def scope_with(*values: bytes) -> dict[str, object]:
    return {"headers": [(b"x-request-id", value) for value in values]}


@pytest.mark.parametrize(
    "sent",
    [
        "a",
        "0f8fad5b-d9cb-469f-a165-70867728950e",
        "Root=1-67891233-abcdef012345678912345678".replace("=", ":"),
        "trace.span:01_-",
        "x" * REQUEST_ID_MAX_LENGTH,
    ],
)
def test_a_sane_id_is_kept(sent: str) -> None:
    assert incoming_request_id(scope_with(sent.encode())) == sent


@pytest.mark.parametrize(
    "sent",
    [
        b"",
        b"x" * (REQUEST_ID_MAX_LENGTH + 1),
        b"with space",
        b"line\nbreak",
        b"trailing-newline\n",
        b'quote"',
        b"caf\xc3\xa9",
        b"Root=1-6789",
        b"a/b",
    ],
)
def test_any_other_id_is_not(sent: bytes) -> None:
    assert incoming_request_id(scope_with(sent)) is None


async def test_a_sane_id_is_echoed_and_in_the_problem(http: httpx.AsyncClient) -> None:
    response = await http.get("/auth/me", headers={"X-Request-ID": "support-ticket-4711"})
    body = assert_problem(response, 401)
    assert response.headers["x-request-id"] == body["request_id"] == "support-ticket-4711"


async def test_an_insane_id_is_replaced_by_a_new_one(http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz", headers={"X-Request-ID": "x" * 129})
    assert GENERATED.fullmatch(response.headers["x-request-id"])


async def test_every_request_without_one_gets_a_new_id(http: httpx.AsyncClient) -> None:
    ids = {(await http.get("/healthz")).headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5
    assert all(GENERATED.fullmatch(request_id) for request_id in ids)


async def test_an_authenticated_answer_carries_it_too(http: httpx.AsyncClient) -> None:
    token = await token_for(http, "ada@example.org")
    response = await http.get("/auth/me", headers={**bearer(token), "X-Request-ID": "me-1"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "me-1"


async def test_the_database_middlewares_503_and_a_500_carry_it(settings: Settings) -> None:
    app = create_app(settings)
    add_failing_routes(app)
    async with serving(app, raise_app_exceptions=False) as http:
        busy_answer = await http.get("/auth/busy", headers={"X-Request-ID": "busy-1"})
        boom_answer = await http.get("/boom", headers={"X-Request-ID": "boom-1"})
    assert assert_problem(busy_answer, 503)["request_id"] == "busy-1"
    assert assert_problem(boom_answer, 500)["request_id"] == "boom-1"


@pytest.fixture
def json_lines() -> Iterator[list[str]]:
    """What loggers under `sparc.test` log, formatted as it is logged (in the request's task)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("sparc.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)


async def test_every_line_logged_while_serving_a_request_names_it(
    settings: Settings, json_lines: list[str]
) -> None:
    logger = logging.getLogger("sparc.test")

    async def chatty(request: Request) -> Response:
        logger.info("first")
        logger.warning("second")
        return PlainTextResponse("ok")

    app = create_app(settings)
    app.router.routes.append(Route("/chatty", chatty))
    async with serving(app) as http:
        first = await http.get("/chatty", headers={"X-Request-ID": "chat-1"})
        second = await http.get("/chatty")
    records = [json.loads(line) for line in json_lines]
    assert [record["message"] for record in records] == ["first", "second"] * 2
    assert [record["request_id"] for record in records] == [
        "chat-1",
        "chat-1",
        second.headers["x-request-id"],
        second.headers["x-request-id"],
    ]
    assert first.headers["x-request-id"] == "chat-1"


def test_the_openapi_document_describes_it() -> None:
    problem = DOCUMENT["components"]["schemas"]["Problem"]["properties"]["request_id"]
    assert problem["maxLength"] == REQUEST_ID_MAX_LENGTH
    for item in DOCUMENT["paths"].values():
        for operation in item.values():
            for answer in operation["responses"].values():
                assert answer["headers"]["X-Request-ID"] == {
                    "$ref": "#/components/headers/RequestId"
                }


async def test_the_servers_own_line_about_a_request_that_raised_can_name_it(
    settings: Settings,
) -> None:
    # uvicorn logs "Exception in ASGI application" in the request's task after the app raised:
    # the id is still set there.
    app = create_app(settings)
    add_failing_routes(app)
    async with serving(app) as http:
        with pytest.raises(RuntimeError, match="boom"):
            await http.get("/boom", headers={"X-Request-ID": "raised-1"})
        assert current_request_id.get() == "raised-1"
