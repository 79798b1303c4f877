"""What a request says about its client: the address it came from and its User-Agent."""

from __future__ import annotations

from starlette.requests import HTTPConnection

# Longer User-Agent headers are cut to this many characters before they are stored.
USER_AGENT_MAX_LENGTH = 512


def client_ip(conn: HTTPConnection) -> str | None:
    return conn.client.host if conn.client else None


def client_user_agent(conn: HTTPConnection) -> str | None:
    return conn.headers.get("user-agent", "")[:USER_AGENT_MAX_LENGTH] or None
