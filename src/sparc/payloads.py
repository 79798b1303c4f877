"""Request bodies: JSON objects read with a size bound and checked field by field."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from sparc.problems import Problem

MAX_BODY_BYTES = 64 * 1024


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or a Problem: 415 not JSON, 413 too large, 400/422 malformed."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise Problem(415, "The request body must be JSON (Content-Type: application/json).")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise Problem(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Problem(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise Problem(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise Problem(422, "The request body must be a JSON object.")
    return body


class FieldErrors:
    """Collects per-field validation failures so one 422 answer lists them all."""

    def __init__(self) -> None:
        self.errors: list[dict[str, str]] = []

    def add(self, field: str, message: str) -> None:
        self.errors.append({"field": field, "message": message})

    def string(self, body: dict[str, Any], field: str, *, min_length: int, max_length: int) -> str:
        value = body.get(field)
        if not isinstance(value, str):
            self.add(field, "is required and must be a string")
            return ""
        if not min_length <= len(value) <= max_length:
            self.add(field, f"must be {min_length} to {max_length} characters long")
        return value

    def raise_if_any(self) -> None:
        if self.errors:
            raise Problem(422, "The request body has invalid fields.", errors=self.errors)
