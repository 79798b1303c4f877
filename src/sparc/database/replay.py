"""Replaying a request whose transaction lost a race: when it is safe, and the request body kept
for the replay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from starlette.types import Message, Receive, Scope

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_RETRY_MARK = "__sparc_retry_on_conflict__"
E = TypeVar("E", bound=Callable[..., Any])


def retry_on_conflict(endpoint: E) -> E:
    """Let DatabaseMiddleware replay this endpoint's requests whatever their method.

    Requests with an idempotent method (GET, HEAD, OPTIONS, PUT, DELETE) are replayed after a
    TransactionConflict anyway; mark a POST or PATCH endpoint with this when everything it does
    happens in its transaction (nothing sent elsewhere), so running it again is safe.
    """
    setattr(endpoint, _RETRY_MARK, True)
    return endpoint


def may_replay(scope: Scope, request: RequestMessages) -> bool:
    """Whether running the request again is safe (its transaction lost a race)."""
    if not request.can_replay():
        return False
    if scope["method"] in IDEMPOTENT_METHODS:
        return True
    # The router has put the matched endpoint in the scope by now.
    return getattr(scope.get("endpoint"), _RETRY_MARK, False) is True


# A request body is kept for a replay up to this size; a larger one makes its request final.
REPLAYABLE_BODY_LIMIT = 1024 * 1024


class RequestMessages:
    """Wraps `receive`: tells, before a commit, whether the client left; keeps the body for a
    replay of the request. Also notes the status of the response that went out."""

    __slots__ = (
        "_body_read",
        "_delivered",
        "_delivered_bytes",
        "_gone",
        "_pending",
        "_receive",
        "_replay",
        "response_status",
    )

    def __init__(self, receive: Receive, *, replayable: bool) -> None:
        self._receive = receive
        self.response_status = 0  # none sent yet
        self._pending: list[Message] = []  # messages we peeked at, handed to the endpoint next
        # The body messages the endpoint got, kept only where a replay may need them again.
        self._delivered: list[Message] | None = [] if replayable else None
        self._delivered_bytes = 0
        self._replay: list[Message] = []
        self._body_read = False
        self._gone = False

    async def receive(self) -> Message:
        if self._replay:
            return self._replay.pop(0)
        message = self._pending.pop(0) if self._pending else await self._receive()
        self._note(message)
        if self._delivered is not None and message["type"] == "http.request":
            self._delivered_bytes += len(message.get("body", b""))
            if self._delivered_bytes > REPLAYABLE_BODY_LIMIT:
                self._delivered = None  # too big to keep for a replay: this one has none
            else:
                self._delivered.append(message)
        return message

    def can_replay(self) -> bool:
        """The client is still there and the endpoint read the whole body or none of it."""
        if self._gone or self._delivered is None:
            return False
        return not self._delivered or not self._delivered[-1].get("more_body", False)

    def rewind(self) -> None:
        """Hand the next run the body messages this one got, then what comes after them."""
        self._replay = list(self._delivered or ())

    def _note(self, message: Message) -> None:
        if message["type"] == "http.disconnect":
            self._gone = True
        elif not message.get("more_body", False):
            self._body_read = True

    async def client_gone(self) -> bool:
        """True if the client has disconnected; never blocks and never loses a message."""
        if not self._gone and not self._body_read:
            # An unread body must be peeked past first: only after it can a disconnect show.
            await self._peek()
        if not self._gone and self._body_read:
            await self._peek()
        return self._gone

    async def _peek(self) -> None:
        # An already-cancelled scope: receive() returns only a message that is ready right now.
        with anyio.CancelScope() as scope:
            scope.cancel()
            message = await self._receive()
            self._pending.append(message)
            self._note(message)
