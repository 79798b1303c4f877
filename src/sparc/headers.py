"""The headers every answer carries: nosniff everywhere, no-store on /auth/ and /admin/."""

from __future__ import annotations

from collections.abc import Sequence

# A browser must take a body as the media type it is labelled with, never sniff another.
CONTENT_TYPE_OPTIONS = "nosniff"
# Answers under these paths carry tokens and personal data: no cache may keep them. A tuple, as
# str.startswith takes it.
NO_STORE_PREFIX = ("/auth/", "/admin/")
CACHE_CONTROL = "no-store"

RawHeaders = Sequence[tuple[bytes, bytes]]

_EVERY_ANSWER: RawHeaders = ((b"x-content-type-options", CONTENT_TYPE_OPTIONS.encode()),)
_NO_STORE_ANSWER: RawHeaders = (*_EVERY_ANSWER, (b"cache-control", CACHE_CONTROL.encode()))


def answer_headers(path: str) -> RawHeaders:
    """The headers added to every answer to a request for `path`.

    DatabaseMiddleware adds them as a response starts (a middleware layer of their own cost 2 %
    of a request's CPU), SPARC's 500 handler to what Starlette's ServerErrorMiddleware sends.
    no-store goes beside a Cache-Control of an endpoint's own: a cache combines the two, and
    no-store forbids keeping the answer whatever the other says.
    """
    return _NO_STORE_ANSWER if path.startswith(NO_STORE_PREFIX) else _EVERY_ANSWER
