"""The OpenAPI document: valid 3.1, complete, and true to what the server answers."""

from __future__ import annotations

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from sparc.app import create_app
from sparc.openapi import DOCUMENT
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
                and path.startswith("/auth/")
                and path not in ("/auth/register", "/auth/login")
            ), path


async def test_served_document_is_the_document(http: httpx.AsyncClient) -> None:
    response = await http.get("/openapi.json")
    assert response.status_code == 200
    assert response.json() == DOCUMENT


def test_the_checker_rejects_what_the_document_does_not_say() -> None:
    request = httpx.Request("GET", "http://t/auth/me")
    with pytest.raises(AssertionError, match="does not list"):
        check_response(httpx.Response(418, json={}, request=request))
    with pytest.raises(Exception, match="is a required property"):
        check_response(httpx.Response(200, json={"id": "x"}, request=request))
