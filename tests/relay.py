"""A TCP relay in front of a PostgreSQL that can stop relaying while keeping every socket open:
what a hung host, a stalled load balancer or a black-holed route looks like to a client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit, urlunsplit


class Relay:
    """Listens on 127.0.0.1; each connection it accepts is relayed to `target_url`'s server."""

    def __init__(self, target_url: str) -> None:
        self._target = urlsplit(target_url)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        """`target_url` reached through the relay."""
        user = self._target.username or "postgres"
        netloc = f"{user}@127.0.0.1:{self.port}"
        return urlunsplit(self._target._replace(netloc=netloc, query=""))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop_relaying(self) -> None:
        """From now on nothing passes either way, and new connections are accepted but never
        reach the server; every socket stays open."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        self.resume()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _open_target(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        socket_dir = parse_qs(self._target.query).get("host", [None])[0]
        if socket_dir:
            port = self._target.port or 5432
            return await asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{port}")
        return await asyncio.open_connection(self._target.hostname, self._target.port or 5432)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._flowing.wait()  # a black hole: accepted, then nothing
            target_reader, target_writer = await self._open_target()
            self._writers.add(target_writer)
            await asyncio.gather(
                self._pump(reader, target_writer), self._pump(target_reader, writer)
            )
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self._flowing.wait()  # held here while the relay is stopped
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()


@contextlib.asynccontextmanager
async def relaying(target_url: str) -> AsyncIterator[Relay]:
    relay = Relay(target_url)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()
