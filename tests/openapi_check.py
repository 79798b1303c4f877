"""Validates real responses against SPARC's own OpenAPI document."""

from __future__ import annotations

import re
from typing import Any

import httpx
from jsonschema import Draft202012Validator, FormatChecker

from sparc.headers import CACHE_CONTROL, CONTENT_TYPE_OPTIONS, NO_STORE_PREFIX
from sparc.openapi import DOCUMENT

_TEMPLATES = [
    (re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"), template)
    for template in DOCUMENT["paths"]
]


def _validate(instance: Any, schema: dict[str, Any]) -> None:
    # Local "$ref"s point at #/components/...: give the schema the document's components.
    rooted = {**schema, "components": DOCUMENT["components"]}
    Draft202012Validator(rooted, format_checker=FormatChecker()).validate(instance)


def _resolved(spec: dict[str, Any]) -> dict[str, Any]:
    """`spec`, or what its local "$ref" points at."""
    reference = spec.get("$ref")
    if reference is None:
        return spec
    node: dict[str, Any] = DOCUMENT
    for part in reference.removeprefix("#/").split("/"):
        node = node[part]
    return node


def check_response(response: httpx.Response) -> None:
    """Fail unless the response's status, headers, media type and body are what the document
    says."""
    method = response.request.method.lower()
    path = response.request.url.path
    template = next((t for pattern, t in _TEMPLATES if pattern.match(path)), None)
    operation = DOCUMENT["paths"].get(template, {}).get(method) if template else None
    media_type = response.headers.get("content-type", "").split(";")[0]
    if operation is None:
        # Not an operation of the API: only a framework 404/405, as a problem, may come back.
        assert response.status_code in (404, 405), f"{method} {path}: {response.status_code}"
        assert media_type == "application/problem+json"
        _validate(response.json(), {"$ref": "#/components/schemas/Problem"})
        # The headers every answer carries, as on the operations' answers.
        assert response.headers["x-content-type-options"] == CONTENT_TYPE_OPTIONS
        request_id = _resolved({"$ref": "#/components/headers/RequestId"})["schema"]
        _validate(response.headers["x-request-id"], request_id)
        if path.startswith(NO_STORE_PREFIX):
            assert response.headers["cache-control"] == CACHE_CONTROL
        return
    described = operation["responses"].get(str(response.status_code))
    assert described is not None, (
        f"{method.upper()} {template} answered {response.status_code}, "
        f"which the OpenAPI document does not list"
    )
    for header, spec in described.get("headers", {}).items():
        assert header.lower() in response.headers, f"{template}: missing {header}"
        _validate(response.headers[header], _resolved(spec)["schema"])
    content = described.get("content")
    if content is None:
        assert response.content == b"", f"{method.upper()} {template}: unexpected body"
        return
    assert media_type in content, f"{method.upper()} {template}: {media_type} not documented"
    if media_type.startswith("text/"):
        _validate(response.text, content[media_type]["schema"])
    else:
        _validate(response.json(), content[media_type]["schema"])


async def check_response_hook(response: httpx.Response) -> None:
    await response.aread()
    check_response(response)
