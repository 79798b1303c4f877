"""Request ids: a client's X-Request-ID kept when it is sane, else a new one; the current one."""

from __future__ import annotations

import random
import re
from contextvars import ContextVar

from starlette.types import Scope

REQUEST_ID_HEADER = "X-Request-ID"
# A client's (or a proxy's) id is kept when it is at most this long and made of these characters:
# enough for a UUID, a trace id or a load balancer's own (`Root=1-67891233-abcdef012345678912345678`
# is 35), too few to carry anything that could break a log line or a header.
REQUEST_ID_MAX_LENGTH = 128
_CHARACTERS = f"[A-Za-z0-9._:-]{{1,{REQUEST_ID_MAX_LENGTH}}}"
REQUEST_ID_PATTERN = f"^{_CHARACTERS}$"  # for the OpenAPI document
# Where the request's id is kept in its ASGI scope, for what runs after the request's own code
# (the access log, the server-error handler).
REQUEST_ID_SCOPE_KEY = "sparc.request_id"

_HEADER_NAME = REQUEST_ID_HEADER.lower().encode()
_SANE = re.compile(_CHARACTERS.encode())
# Random bytes of a generated id: 128 bits, written as 32 hex digits. From `random`, not the
# kernel: an id names a request, it guards nothing, and os.urandom costs a getrandom system call
# a request (0.5 against 0.18 microseconds here). `random` is reseeded in a forked worker, so
# workers' ids differ; OpenTelemetry makes its trace ids the same way. Its state can be worked
# out from enough ids: nothing that must be unpredictable (a token, a secret) may come from it.
_GENERATED_BYTES = 16

# The id of the request this task serves, None outside requests. It is set as the request
# arrives and not reset after: the server runs each request in a task of its own, whose context
# ends with it, and the server's own line about a request that raised must still name it.
current_request_id: ContextVar[str | None] = ContextVar("sparc_request_id", default=None)


def new_request_id() -> str:
    return random.randbytes(_GENERATED_BYTES).hex()


def incoming_request_id(scope: Scope) -> str | None:
    """The request's X-Request-ID if it is sane, else None."""
    for name, value in scope["headers"]:
        if name == _HEADER_NAME:
            return value.decode("ascii") if _SANE.fullmatch(value) else None
    return None


def begin_request(scope: Scope) -> tuple[bytes, bytes]:
    """Give the arriving request its id (in its scope and `current_request_id`); the header that
    echoes it on the answer."""
    request_id = incoming_request_id(scope) or new_request_id()
    scope[REQUEST_ID_SCOPE_KEY] = request_id
    current_request_id.set(request_id)
    return (_HEADER_NAME, request_id.encode("ascii"))


def request_id_of(scope: Scope) -> str | None:
    """The id `begin_request` gave the request of `scope`."""
    request_id: str | None = scope.get(REQUEST_ID_SCOPE_KEY)
    return request_id
