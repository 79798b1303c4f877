"""The OpenAPI document: valid 3.1, complete, and true to what the server answers."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from sparc.app import create_app
from sparc.audit import EVENT_TYPES, PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX
from sparc.auth import (
    EMAIL_MAX_LENGTH,
    GIVEN_PASSWORD_MIN_LENGTH,
    PASSWORD_MAX_LENGTH,
    PASSWORD_MIN_LENGTH,
)
from sparc.clients import USER_AGENT_MAX_LENGTH
from sparc.openapi import DOCUMENT
from sparc.payloads import MAX_BODY_BYTES
from sparc.security import new_token
from sparc.settings import Settings
from tests.openapi_check import check_response

pytestmark = pytest.mark.anyio


def test_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1")
    validate(DOCUMENT)


def test_document_describes_every_route_and_nothing_else() -> None:
    app = create_app(Settings())
    served = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    described = {(path, method) for path, item in DOCUMENT["paths"].items() for method in item}
    assert served == described


def test_protected_operations_name_the_bearer_scheme() -> None:
    assert DOCUMENT["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, item in DOCUMENT["paths"].items():
        for operation in item.values():
            secured = operation["security"] == [{"bearer": []}]
            assert secured == (
                "401" in operation["responses"]
                and path.startswith(("/auth/", "/admin/"))
                and path not in ("/auth/register", "/auth/login")
            ), path


def _schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = DOCUMENT["components"]["schemas"][name]
    return schema


@pytest.mark.parametrize(
    ("schema", "field", "min_length"),
    [
        ("Registration", "password", PASSWORD_MIN_LENGTH),
        ("PasswordChange", "new_password", PASSWORD_MIN_LENGTH),
        ("Credentials", "password", GIVEN_PASSWORD_MIN_LENGTH),
        ("PasswordChange", "current_password", GIVEN_PASSWORD_MIN_LENGTH),
    ],
)
def test_passwords_have_the_enforced_lengths(schema: str, field: str, min_length: int) -> None:
    password = _schema(schema)["properties"][field]
    assert (password["minLength"], password["maxLength"]) == (min_length, PASSWORD_MAX_LENGTH)


def test_emails_have_the_enforced_maximum_length() -> None:
    for schema in ("Registration", "Credentials"):
        assert _schema(schema)["properties"]["email"]["maxLength"] == EMAIL_MAX_LENGTH


def test_every_body_too_large_answer_names_the_enforced_limit() -> None:
    with_body = [
        operation
        for item in DOCUMENT["paths"].values()
        for operation in item.values()
        if "requestBody" in operation
    ]
    assert with_body
    for operation in with_body:
        assert f"{MAX_BODY_BYTES} bytes" in operation["responses"]["413"]["description"]


def test_the_event_page_size_is_the_enforced_one() -> None:
    parameters = DOCUMENT["paths"]["/auth/events"]["get"]["parameters"]
    limit = next(parameter for parameter in parameters if parameter["name"] == "limit")
    assert limit["schema"]["minimum"] == 1
    assert limit["schema"]["maximum"] == PAGE_SIZE_MAX
    assert limit["schema"]["default"] == PAGE_SIZE_DEFAULT


def test_the_access_token_length_is_that_of_a_new_token() -> None:
    token, _ = new_token()
    assert _schema("Token")["properties"]["access_token"]["minLength"] == len(token)


def test_user_agents_have_the_stored_maximum_length() -> None:
    for schema in ("Session", "Event"):
        user_agent = _schema(schema)["properties"]["user_agent"]
        assert user_agent["maxLength"] == USER_AGENT_MAX_LENGTH, schema


def test_the_event_types_are_the_recorded_ones() -> None:
    assert _schema("Event")["properties"]["type"]["enum"] == list(EVENT_TYPES)


async def test_served_document_is_the_document(http: httpx.AsyncClient) -> None:
    response = await http.get("/openapi.json")
    assert response.status_code == 200
    assert response.json() == DOCUMENT


def test_the_checker_rejects_what_the_document_does_not_say() -> None:
    request = httpx.Request("GET", "http://t/auth/me")
    with pytest.raises(AssertionError, match="does not list"):
        check_response(httpx.Response(418, json={}, request=request))
    with pytest.raises(AssertionError, match="missing X-Content-Type-Options"):
        check_response(httpx.Response(200, json={"id": "x"}, request=request))
    headers = {
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
        "X-Request-ID": "a1",
    }
    with pytest.raises(Exception, match="'nosniff' was expected"):
        check_response(
            httpx.Response(
                200, headers={**headers, "X-Content-Type-Options": "sniff"}, request=request
            )
        )
    with pytest.raises(Exception, match="does not match"):
        check_response(
            httpx.Response(200, headers={**headers, "X-Request-ID": "a b"}, request=request)
        )
    with pytest.raises(Exception, match="is a required property"):
        check_response(httpx.Response(200, json={"id": "x"}, headers=headers, request=request))
