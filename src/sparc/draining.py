"""The HTTP protocol `sparc serve` runs: a shutdown cuts no keep-alive connection under a request,
and an answer goes out in one send.

uvicorn's own closes every idle keep-alive connection the moment shutdown begins. A proxy that
keeps connections to SPARC open (nginx's upstream `keepalive`) may be sending a request down one
of them at that moment: the request meets a reset, and a proxy cannot tell whether it was
applied, so it answers 502 rather than pass a POST on to another instance (deploy/'s rolling
restart test saw it happen). Here an idle connection stays open through the shutdown: a request
that arrives on it is served and answered with `Connection: close`, after which it closes;
otherwise its client closes it, or its keep-alive timeout (uvicorn's 5 s, longer than nginx's
upstream `keepalive_timeout`) does, as it would have without the shutdown. A connection with a
request in flight closes after that answer, as in uvicorn.

Its writes go through sparc.coalesced_writes: an answer's head and body leave together, in one
system call and one TCP segment instead of two.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sparc.coalesced_writes import CoalescingTransport


class DrainingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (what `uvicorn[standard]` runs), draining at shutdown, its
    answers sent whole."""

    draining = False
    coalescing: CoalescingTransport

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.coalescing = CoalescingTransport(transport, self.loop)
        super().connection_made(self.coalescing)

    def on_response_complete(self) -> None:
        self.coalescing.flush()  # the answer is whole: out it goes, before anything else runs
        super().on_response_complete()

    def shutdown(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            super().shutdown()  # in flight: this answer carries Connection: close
            return
        self.draining = True
        if self.timeout_keep_alive_task is None:  # a connection that never sent a request
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.draining and self.cycle is not None:
            self.cycle.keep_alive = False  # the last answer on this connection
