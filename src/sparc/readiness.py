"""When `sparc serve` is ready, and the line it logs then: the address to open."""

from __future__ import annotations

import logging
import socket

import uvicorn

logger = logging.getLogger("sparc")


def announce_ready(host: str, port: int) -> None:
    address = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    logger.info("SPARC ready at %s", address)


def announcing_server(config: uvicorn.Config) -> uvicorn.Server:
    """uvicorn's server of one worker, announcing itself once the app has started and listens
    (on the port it got, with --port 0)."""

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.servers and self.servers[0].sockets:
                announce_ready(config.host, self.servers[0].sockets[0].getsockname()[1])

    return AnnouncingServer(config)


def listening(host: str, port: int) -> bool:
    """True once a worker listens on the shared socket of --workers N: it does so only after its
    app has started. A bare connection, closed unsent: a request would show in logs and metrics."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
