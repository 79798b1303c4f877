"""What a request says about its client: the address it came from and its User-Agent."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from sparc.text import storable_text

# Longer User-Agent headers are cut to this many characters before they are stored.
USER_AGENT_MAX_LENGTH = 512


def client_ip(conn: HTTPConnection) -> str | None:
    """The client's address (behind trusted proxies, as sparc.proxies put it in the scope)."""
    return conn.client.host if conn.client else None


def client_user_agent(conn: HTTPConnection) -> str | None:
    """The User-Agent as it may be stored: control characters escaped, cut to the bound."""
    return storable_text(conn.headers.get("user-agent", ""), USER_AGENT_MAX_LENGTH) or None
