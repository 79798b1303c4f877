"""Request bodies: JSON objects read with a size bound and checked field by field."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from sparc.problems import Problem
from sparc.text import escape_control_characters, unstorable

MAX_BODY_BYTES = 64 * 1024
UNSTORABLE_MESSAGE = "holds a character that cannot be stored (NUL or an unpaired surrogate)"


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or a Problem: 415 not JSON, 413 too large, 400/422 malformed.

    A body holding a string that PostgreSQL or UTF-8 cannot take, anywhere in it (keys too), is
    refused here with a 422 naming its top-level field, so no endpoint ever sees one.
    """
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise Problem(415, "The request body must be JSON (Content-Type: application/json).")
    declared = request.headers.get("content-length")
    # isascii() too: str.isdigit() takes "²", which int() refuses.
    if declared and declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise Problem(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Problem(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
        chunks.append(chunk)
    try:
        # Strictly UTF-8 (RFC 8259): json.loads would take bytes as UTF-16 or UTF-32 too, and
        # decode UTF-8-encoded surrogates ("surrogatepass") into unstorable text.
        body = json.loads(b"".join(chunks).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise Problem(400, "The request body is not valid JSON.") from None
    except RecursionError:
        # 64 KiB of "[" nests deeper than the decoder's recursion allows.
        raise Problem(400, "The request body is nested too deeply.") from None
    if not isinstance(body, dict):
        raise Problem(422, "The request body must be a JSON object.")
    errors = FieldErrors()
    for key, value in body.items():
        if unstorable(key):
            # Named escaped: the answer itself must be encodable.
            errors.add(escape_control_characters(key), UNSTORABLE_MESSAGE)
        elif _holds_unstorable(value):
            errors.add(key, UNSTORABLE_MESSAGE)
    errors.raise_if_any()
    return body


def _holds_unstorable(value: object) -> bool:
    """True when a string anywhere in `value` (an object's keys included) cannot be stored."""
    pending = [value]
    while pending:  # a loop, not recursion: the depth is the client's choice
        item = pending.pop()
        if isinstance(item, str):
            if unstorable(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


class FieldErrors:
    """Collects per-field validation failures so one 422 answer lists them all."""

    def __init__(self) -> None:
        self.errors: list[dict[str, str]] = []

    def add(self, field: str, message: str) -> None:
        self.errors.append({"field": field, "message": message})

    def has(self, field: str) -> bool:
        """True once `field` has failed a check."""
        return any(error["field"] == field for error in self.errors)

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
