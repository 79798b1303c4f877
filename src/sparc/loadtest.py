"""`sparc loadtest`: drive a running SPARC with many clients and watch its connection count.

It registers a throwaway user, logs in, and has `concurrency` clients call GET /auth/me (and
POST /auth/login at `login_ratio`) over keep-alive connections for `duration` seconds, while it
samples pg_stat_activity for the service's database every 100 ms. The verdict: the peak number of
server connections must stay within the service's bound (workers times DB_POOL_MAX_SIZE, from
/readyz), and no answer may be a 5xx other than 503.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sparc.database import DatabaseClient
from sparc.settings import Settings

SAMPLE_INTERVAL = 0.1
TRANSPORT_ERROR = 0  # the "status" of a request that got no HTTP answer at all


class LoadtestError(Exception):
    """The load test could not run (service unreachable, setup request refused)."""


class _Connection:
    """A minimal keep-alive HTTP/1.1 client: cheap enough per request not to be the bottleneck."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, timeout: float) -> None:
        self._host, self._port, self._tls, self._timeout = host, port, tls, timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, target: str, headers: bytes, body: bytes = b""
    ) -> tuple[int, bytes]:
        try:
            async with asyncio.timeout(self._timeout):
                return await self._exchange(method, target, headers, body)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            self.close()
            return TRANSPORT_ERROR, b""

    async def _exchange(
        self, method: str, target: str, headers: bytes, body: bytes
    ) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self._host, self._port, ssl=self._tls
            )
        assert self._reader is not None
        self._writer.write(
            b"%s %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n%s"
            % (method.encode(), target.encode(), self._host.encode(), headers, len(body), body)
        )
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        fields = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "content-length" in fields:
            payload = await self._reader.readexactly(int(fields["content-length"]))
        elif fields.get("transfer-encoding", "").lower() == "chunked":
            payload = await self._read_chunked()
        else:
            payload = b""
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status, payload

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        chunks: list[bytes] = []
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await self._reader.readexactly(size + 2)
            if size == 0:
                return b"".join(chunks)
            chunks.append(chunk[:-2])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


@dataclass
class Tally:
    started: float = field(default_factory=time.monotonic)
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    connections_now: int = 0
    peak_connections: int = 0
    samples: int = 0

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status == 0 or status >= 500)


@dataclass(frozen=True)
class Report:
    url: str
    concurrency: int
    duration_seconds: float
    login_ratio: float
    requests: int
    requests_per_second: float
    latency_ms: dict[str, float]
    status_counts: dict[str, int]
    transport_errors: int
    unexpected_5xx: int
    peak_connections: int
    connection_bound: int
    connection_samples: int

    @property
    def bound_exceeded(self) -> bool:
        return self.peak_connections > self.connection_bound

    @property
    def passed(self) -> bool:
        return not self.bound_exceeded and self.unexpected_5xx == 0 and self.transport_errors == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "bound_exceeded": self.bound_exceeded,
            "passed": self.passed,
        }


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def run_loadtest(
    *,
    url: str,
    database_settings: Settings,
    concurrency: int,
    duration: float,
    login_ratio: float,
    on_progress: Callable[[Tally], None] | None = None,
) -> Report:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadtestError(f"--url {url!r} must be an http:// or https:// URL")
    tls = ssl.create_default_context() if parts.scheme == "https" else None
    port = parts.port or (443 if tls else 80)
    prefix = parts.path.rstrip("/")

    def connection() -> _Connection:
        return _Connection(parts.hostname or "", port, tls, timeout=30)

    setup = connection()
    credentials = json.dumps(
        {
            "email": f"loadtest-{secrets.token_hex(6)}@example.org",
            "password": secrets.token_urlsafe(18),
        }
    ).encode()
    json_headers = b"Content-Type: application/json\r\n"
    status, _ = await setup.request("POST", f"{prefix}/auth/register", json_headers, credentials)
    if status != 201:
        raise LoadtestError(f"POST {prefix}/auth/register answered {status or 'nothing'}")
    status, body = await setup.request("POST", f"{prefix}/auth/login", json_headers, credentials)
    if status != 200:
        raise LoadtestError(f"POST {prefix}/auth/login answered {status or 'nothing'}")
    token = json.loads(body)["access_token"]
    status, body = await setup.request("GET", f"{prefix}/readyz", b"")
    if status != 200:
        raise LoadtestError(f"GET {prefix}/readyz answered {status or 'nothing'}")
    ready = json.loads(body)
    bound = int(ready.get("connection_bound") or ready["pool"]["max"])
    setup.close()

    tally = Tally()
    me_headers = f"Authorization: Bearer {token}\r\n".encode()
    deadline = time.monotonic() + duration

    async def client() -> None:
        conn = connection()
        while time.monotonic() < deadline:
            started = time.perf_counter()
            if login_ratio and random.random() < login_ratio:
                status, _ = await conn.request(
                    "POST", f"{prefix}/auth/login", json_headers, credentials
                )
            else:
                status, _ = await conn.request("GET", f"{prefix}/auth/me", me_headers)
            tally.latencies.append(time.perf_counter() - started)
            tally.statuses[status] += 1
        conn.close()

    sampler_client = DatabaseClient(
        Settings(
            database_url=database_settings.database_url,
            pool_min_size=1,
            pool_max_size=1,
            connect_timeout=database_settings.connect_timeout,
            data_dir=database_settings.data_dir,
        ),
        application_name="sparc-loadtest",
    )

    async def sample() -> None:
        while time.monotonic() < deadline:
            tally.connections_now = await sampler_client.fetch_val(
                """
                SELECT count(*) FROM pg_stat_activity
                WHERE datname = current_database() AND pid <> pg_backend_pid()
                  AND backend_type = 'client backend'
                """
            )
            tally.peak_connections = max(tally.peak_connections, tally.connections_now)
            tally.samples += 1
            if on_progress is not None:
                on_progress(tally)
            await asyncio.sleep(SAMPLE_INTERVAL)

    async with sampler_client:
        tally.started = time.monotonic()
        await asyncio.gather(sample(), *(client() for _ in range(concurrency)))
    elapsed = time.monotonic() - tally.started

    ordered = sorted(tally.latencies)
    statuses = tally.statuses
    return Report(
        url=url,
        concurrency=concurrency,
        duration_seconds=round(elapsed, 3),
        login_ratio=login_ratio,
        requests=tally.requests,
        requests_per_second=round(tally.requests / elapsed, 1),
        latency_ms={
            name: round(_percentile(ordered, fraction) * 1000, 2)
            for name, fraction in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
        },
        status_counts={str(status): n for status, n in sorted(statuses.items()) if status},
        transport_errors=statuses[TRANSPORT_ERROR],
        unexpected_5xx=sum(n for status, n in statuses.items() if status >= 500 and status != 503),
        peak_connections=tally.peak_connections,
        connection_bound=bound,
        connection_samples=tally.samples,
    )
