"""The pieces each route module describes its operations with in the OpenAPI document.

A module declares `operations`, mapping each endpoint of its `routes` to its entry; sparc.openapi
pairs them by route, so a path or method in the document is always the one the route serves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from starlette.routing import Route

from sparc.headers import NO_STORE_PREFIX
from sparc.payloads import MAX_BODY_BYTES
from sparc.problems import PROBLEM_MEDIA_TYPE
from sparc.request_ids import REQUEST_ID_HEADER

JSON_MEDIA_TYPE = "application/json"

Operation = dict[str, Any]
Operations = Mapping[Callable[..., Any], Operation]


def schema_ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def header_ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/headers/{name}"}


def string_schema(**extra: Any) -> dict[str, Any]:
    return {"type": "string", **extra}


def json_answer(schema_name: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {JSON_MEDIA_TYPE: {"schema": schema_ref(schema_name)}},
    }


def problem_answer(description: str, *, retry_after: bool = False) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": schema_ref("Problem")}},
    }
    if retry_after:
        answer["headers"] = {"Retry-After": header_ref("RetryAfter")}
    return answer


NO_CONTENT = {"description": "Done; no body."}
# Every endpoint can answer these.
_COMMON = {
    "500": problem_answer("The server failed; nothing the request wrote was kept."),
    "503": problem_answer(
        "The database is unavailable, its pool exhausted, or the request's transaction kept "
        "losing races with others; nothing was kept, retry later.",
        retry_after=True,
    ),
}
# What sparc.payloads.read_json_object answers for a body it cannot take.
_BODY_ERRORS = {
    "400": problem_answer("The body is not valid JSON."),
    "413": problem_answer(f"The body is larger than {MAX_BODY_BYTES} bytes."),
    "415": problem_answer("The body is not JSON."),
    "422": problem_answer("Fields are missing or invalid; `errors` lists them."),
}
_UNAUTHORIZED = {
    "401": problem_answer("No valid bearer token; the answer carries `WWW-Authenticate: Bearer`.")
}
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
# What sparc.headers adds to every answer (and sparc.request_ids the request's id), and to every
# answer under NO_STORE_PREFIX.
_EVERY_ANSWER_HEADERS = {
    "X-Content-Type-Options": header_ref("ContentTypeOptions"),
    REQUEST_ID_HEADER: header_ref("RequestId"),
}
_NO_STORE_HEADERS = {**_EVERY_ANSWER_HEADERS, "Cache-Control": header_ref("CacheControl")}


def operation(
    summary: str,
    responses: dict[str, Any],
    *,
    body: str | None = None,
    secured: bool = False,
    parameters: list[dict[str, Any]] | None = None,
) -> Operation:
    """One operation's entry: its own responses, plus those its body and bearer token can cause
    and those every endpoint can give."""
    entry: Operation = {"summary": summary, "responses": {**responses, **_COMMON}}
    if body is not None:
        entry["requestBody"] = {
            "required": True,
            "content": {JSON_MEDIA_TYPE: {"schema": schema_ref(body)}},
        }
        entry["responses"] = {**_BODY_ERRORS, **entry["responses"]}
    if secured:
        entry["security"] = _BEARER
        entry["responses"] = {**_UNAUTHORIZED, **entry["responses"]}
    else:
        entry["security"] = []
    if parameters:
        entry["parameters"] = parameters
    return entry


def path_items(*described: tuple[Sequence[Route], Operations]) -> dict[str, dict[str, Operation]]:
    """The document's `paths`: for each module's routes, each method's entry from the module's
    operations, found by the route's endpoint."""
    items: dict[str, dict[str, Operation]] = {}
    for routes, operations in described:
        for route in routes:
            for method in sorted(route.methods or ()):
                if method != "HEAD":  # Starlette adds HEAD to every GET route
                    entry = _with_added_headers(route.path, operations[route.endpoint])
                    items.setdefault(route.path, {})[method.lower()] = entry
    return items


def _with_added_headers(path: str, entry: Operation) -> Operation:
    """`entry` with the headers sparc.headers adds to every answer at `path` on each response."""
    added = _NO_STORE_HEADERS if path.startswith(NO_STORE_PREFIX) else _EVERY_ANSWER_HEADERS
    responses = {
        status: {**answer, "headers": {**added, **answer.get("headers", {})}}
        for status, answer in entry["responses"].items()
    }
    return {**entry, "responses": responses}
