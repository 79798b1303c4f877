"""Problem details (RFC 9457): the one shape of every error answer SPARC gives."""

from __future__ import annotations

import http
import json
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from sparc.headers import answer_headers
from sparc.request_ids import REQUEST_ID_HEADER, current_request_id, request_id_of

PROBLEM_MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    """Raise to answer with a problem document; `errors` lists per-field failures (for 422)."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        errors: Sequence[Mapping[str, str]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or http.HTTPStatus(status).phrase
        self.headers = dict(headers or {})
        self.errors = list(errors) if errors is not None else None

    def to_response(self) -> Response:
        return problem_response(
            self.status, self.detail, title=self.title, headers=self.headers, errors=self.errors
        )


def problem_response(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    headers: Mapping[str, str] | None = None,
    errors: Sequence[Mapping[str, str]] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title or http.HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = list(errors)
    # What a client quotes when it reports this answer; the request's log lines carry it too.
    request_id = current_request_id.get()
    if request_id is not None:
        body["request_id"] = request_id
    return Response(
        json.dumps(body, ensure_ascii=False).encode(),
        status_code=status,
        headers=dict(headers or {}),
        media_type=PROBLEM_MEDIA_TYPE,
    )


async def handle_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return exc.to_response()


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if exc.detail else http.HTTPStatus(exc.status_code).phrase
    return problem_response(exc.status_code, detail, headers=exc.headers)


async def handle_server_error(request: Request, exc: Exception) -> Response:
    # The traceback goes to the server log (Starlette logs it); the client learns nothing internal.
    response = problem_response(500, "The server failed to handle this request.")
    # ServerErrorMiddleware sends this past every other middleware: it needs the headers here.
    response.raw_headers.extend(answer_headers(request.scope["path"]))
    request_id = request_id_of(request.scope)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response
