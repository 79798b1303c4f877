"""Trusted proxies: behind a load balancer, the client's address comes from X-Forwarded-For.

Only a peer listed in SPARC_TRUSTED_PROXIES is believed. Its X-Forwarded-For is read from the
right, where each proxy appends the address it got the request from; the first entry that is
not itself a trusted proxy is the client (uvicorn's rule). Anything left of it was written by
the client and proves nothing. From any other peer the header is ignored, so nobody can pick
the address throttling, sessions, audit events and logs see.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from sparc.settings import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> IPAddress | None:
    """An address as proxies write it (`192.0.2.1`, `2001:db8::1`, `[2001:db8::1]:4711`,
    `192.0.2.1:4711`), or None if it is none."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # IPv4 with a port
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class TrustedProxies:
    """Which peers may tell the client's address, and what they tell."""

    def __init__(self, networks: Sequence[IPNetwork]) -> None:
        self._networks = tuple(networks)

    def trusts(self, address: IPAddress | None) -> bool:
        return address is not None and any(address in network for network in self._networks)

    def client_address(self, peer: str, forwarded_for: Sequence[str]) -> str:
        """The client's address for a request from `peer` carrying `forwarded_for` entries."""
        if not self.trusts(parse_address(peer)):
            return peer
        entries = [entry for header in forwarded_for for entry in header.split(",")]
        for entry in reversed(entries):
            address = parse_address(entry)
            if address is None:
                # A trusted proxy wrote this; garbage means the chain cannot be believed.
                return peer
            if not self.trusts(address):
                return str(address)
        # Every hop is a trusted proxy: the leftmost one is as far as the chain reaches.
        first = parse_address(entries[0]) if entries else None
        return str(first) if first is not None else peer


class TrustedProxyMiddleware:
    """Puts the client's address, as the trusted proxies tell it, into the ASGI scope."""

    def __init__(self, app: ASGIApp, proxies: TrustedProxies) -> None:
        self.app = app
        self.proxies = proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] in ("http", "websocket") and client:
            forwarded_for = [
                value.decode("latin-1")
                for name, value in scope["headers"]
                if name == b"x-forwarded-for"
            ]
            if forwarded_for:
                address = self.proxies.client_address(client[0], forwarded_for)
                # In place, as uvicorn's own proxy middleware does, so that the server's log
                # line names the client too. The port was the proxy's; the client's is unknown.
                scope["client"] = (address, 0)
        await self.app(scope, receive, send)
