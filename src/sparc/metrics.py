"""Prometheus metrics: pool, transactions, HTTP requests and purge, summed across workers.

With PROMETHEUS_MULTIPROC_DIR set (`sparc serve` sets it), every worker process writes its
figures to files there and GET /metrics on any worker reports all of them.

The request path only adds to plain Python tallies; they reach prometheus-client (whose every
update takes a lock, and in multiprocess mode writes to a memory-mapped file) once a second,
before each exposition and at shutdown. Another worker's figures can therefore be up to a
second (POOL_SAMPLE_SECONDS) behind in a scrape.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import AsyncIterator

import anyio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Scope

from sparc.database import DatabaseClient, PoolEvents
from sparc.mail_delivery import MailEvents
from sparc.openapi_parts import Operations, operation
from sparc.outbox import KINDS
from sparc.retention import PURGED_TABLES, PurgeEvents
from sparc.route_templates import route_template
from sparc.settings import metrics_directory
from sparc.state import metrics_of

# How often each worker copies its pool's figures into the gauges.
POOL_SAMPLE_SECONDS = 1.0

_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# From queueing to the server taking it: a fraction of a second, or minutes across an outage.
_MAIL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})


class _HistogramTally:
    """Observations kept per bucket until `flush` adds them to a prometheus-client Histogram.

    Uses the histogram's own bucket bounds, sum and bucket values (private to prometheus-client;
    tests/test_metrics.py checks the result equals observing directly).
    """

    __slots__ = ("_bounds", "_counts", "_histogram", "_sum")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._bounds: list[float] = histogram._upper_bounds
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # The first bucket whose upper bound is >= value, as Histogram.observe picks.
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def flush(self) -> None:
        counts, self._counts = self._counts, [0] * len(self._bounds)
        total, self._sum = self._sum, 0.0
        if not any(counts):
            return
        self._histogram._sum.inc(total)
        for bucket, count in zip(self._histogram._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


class Metrics(PoolEvents, PurgeEvents, MailEvents):
    """Every metric SPARC exports, on a registry of its own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry

        def gauge(name: str, documentation: str) -> Gauge:
            # livesum: across workers, the sum over the processes still alive.
            return Gauge(name, documentation, registry=registry, multiprocess_mode="livesum")

        self.pool_size = gauge("sparc_db_pool_size", "Open pooled connections.")
        self.pool_idle = gauge("sparc_db_pool_idle", "Pooled connections not in use.")
        self.pool_in_use = gauge("sparc_db_pool_in_use", "Pooled connections in use.")
        self.pool_waiting = gauge("sparc_db_pool_waiting", "Requests waiting for a connection.")
        self.pool_max = gauge("sparc_db_pool_max", "The pools' bound (DB_POOL_MAX_SIZE each).")
        self.acquire_wait = Histogram(
            "sparc_db_pool_acquire_wait_seconds",
            "Time from asking the pool for a connection to getting one.",
            buckets=_WAIT_BUCKETS,
            registry=registry,
        )
        self.acquire_timeouts = Counter(
            "sparc_db_pool_acquire_timeouts",
            "Requests that got no connection within DB_POOL_TIMEOUT.",
            registry=registry,
        )
        self.acquire_refusals = Counter(
            "sparc_db_pool_acquire_refused",
            "Requests refused at once because DB_POOL_MAX_WAITING others already waited.",
            registry=registry,
        )
        self.opened = Counter(
            "sparc_db_connections_opened", "Connections opened.", registry=registry
        )
        self.closed = Counter(
            "sparc_db_connections_closed", "Connections closed.", registry=registry
        )
        self.discarded = Counter(
            "sparc_db_connections_discarded",
            "Connections thrown away as broken instead of reused.",
            registry=registry,
        )
        transactions = Counter(
            "sparc_db_transactions",
            "Transactions ended, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.committed = transactions.labels(outcome="committed")
        self.rolled_back = transactions.labels(outcome="rolled_back")
        self.retries = Counter(
            "sparc_db_transaction_retries",
            "Requests run again after their transaction lost a race "
            "(serialization_failure, deadlock_detected).",
            registry=registry,
        )
        self.requests = Counter(
            "sparc_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "sparc_http_request_duration_seconds",
            "Time from a request's arrival to its response's end, by route template.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        purged_rows = Counter(
            "sparc_purged_rows",
            "Rows the retention purge deleted, by table.",
            ["table"],
            registry=registry,
        )
        self._purged_rows = {table: purged_rows.labels(table=table) for table in PURGED_TABLES}

        def by_kind(name: str, documentation: str) -> dict[str, Counter]:
            counter = Counter(name, documentation, ["kind"], registry=registry)
            return {kind: counter.labels(kind=kind) for kind in KINDS}

        self._mail_queued = by_kind(
            "sparc_mail_queued", "Mails committed to the outbox (counted at their first attempt)."
        )
        self._mail_sent = by_kind("sparc_mail_sent", "Mails the transport took.")
        self._mail_retried = by_kind(
            "sparc_mail_retries", "Failed delivery attempts that will be tried again."
        )
        self._mail_failed = by_kind("sparc_mail_failed", "Mails given up on, marked failed.")
        self.mail_delivery = Histogram(
            "sparc_mail_delivery_seconds",
            "Time from a mail's queueing in the outbox to the transport taking it.",
            buckets=_MAIL_BUCKETS,
            registry=registry,
        )
        self._mail_deliveries = _HistogramTally(self.mail_delivery)
        # What happened since the last flush(), by the counter or histogram it goes to.
        self._counts: dict[Counter, int] = {}
        self._acquire_waits = _HistogramTally(self.acquire_wait)
        self._latencies: dict[tuple[str, str], _HistogramTally] = {}
        # labels() looks children up by string each time; caching keeps it off the hot path.
        self._request_counters: dict[tuple[str, str, int], Counter] = {}

    def _count(self, counter: Counter, amount: int = 1) -> None:
        self._counts[counter] = self._counts.get(counter, 0) + amount

    def request_answered(self, scope: Scope, status: int, seconds: float) -> None:
        """Count one HTTP request by route template (not raw path), method and status, and
        time it. DatabaseMiddleware reports every request here."""
        # Answered before routing (a 503 while authenticating, say): counted under the route
        # it was for rather than as unmatched.
        route = route_template(scope) or "unmatched"
        method = scope["method"]
        if method not in _METHODS:
            method = "other"  # the client names the method: keep the label set bounded
        key = (route, method, status)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self.requests.labels(route=route, method=method, status=status)
            self._request_counters[key] = counter
        self._counts[counter] = self._counts.get(counter, 0) + 1
        latency = self._latencies.get((route, method))
        if latency is None:
            latency = _HistogramTally(self.latency.labels(route=route, method=method))
            self._latencies[(route, method)] = latency
        latency.observe(seconds)

    def flush(self) -> None:
        """Hand everything tallied since the last flush to prometheus-client."""
        counts, self._counts = self._counts, {}
        for counter, count in counts.items():
            counter.inc(count)
        self._acquire_waits.flush()
        self._mail_deliveries.flush()
        for latency in self._latencies.values():
            latency.flush()

    # PoolEvents
    def acquired(self, wait_seconds: float) -> None:
        self._acquire_waits.observe(wait_seconds)

    def acquire_timed_out(self) -> None:
        self._count(self.acquire_timeouts)

    def acquire_refused(self) -> None:
        self._count(self.acquire_refusals)

    def connection_opened(self) -> None:
        self._count(self.opened)

    def connection_closed(self) -> None:
        self._count(self.closed)

    def connection_discarded(self) -> None:
        self._count(self.discarded)

    def transaction_finished(self, *, committed: bool) -> None:
        self._count(self.committed if committed else self.rolled_back)

    def transaction_retried(self) -> None:
        self._count(self.retries)

    # PurgeEvents
    def rows_purged(self, table: str, count: int) -> None:
        self._count(self._purged_rows[table], count)

    # MailEvents
    def mail_queued(self, kind: str) -> None:
        self._count(self._mail_queued[kind])

    def mail_sent(self, kind: str, seconds: float) -> None:
        self._count(self._mail_sent[kind])
        self._mail_deliveries.observe(seconds)

    def mail_retried(self, kind: str) -> None:
        self._count(self._mail_retried[kind])

    def mail_failed(self, kind: str) -> None:
        self._count(self._mail_failed[kind])

    def sample_pool(self, client: DatabaseClient) -> None:
        stats = client.pool_stats()
        self.pool_size.set(stats.size)
        self.pool_idle.set(stats.idle)
        self.pool_in_use.set(stats.in_use)
        self.pool_waiting.set(stats.waiting)
        self.pool_max.set(stats.max)

    @contextlib.asynccontextmanager
    async def sampling(self, client: DatabaseClient) -> AsyncIterator[None]:
        """Keep the pool gauges current while the app runs; zero them when it stops."""
        async with anyio.create_task_group() as group:

            async def sample_forever() -> None:
                while True:
                    self.sample_pool(client)
                    self.flush()
                    await anyio.sleep(POOL_SAMPLE_SECONDS)

            group.start_soon(sample_forever)
            try:
                yield
            finally:
                group.cancel_scope.cancel()
                self.flush()
                for gauge in (self.pool_size, self.pool_idle, self.pool_in_use, self.pool_waiting):
                    gauge.set(0)
                self.pool_max.set(0)

    def exposition(self) -> bytes:
        self.flush()
        directory = metrics_directory()
        if directory is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


async def metrics_endpoint(request: Request) -> Response:
    return Response(metrics_of(request).exposition(), media_type=CONTENT_TYPE_LATEST)


routes = [Route("/metrics", metrics_endpoint, methods=["GET"])]
operations: Operations = {
    metrics_endpoint: operation(
        "Prometheus metrics of every worker",
        {
            "200": {
                # The exposition format's version is whichever prometheus-client writes.
                "description": f"Prometheus text exposition format ({CONTENT_TYPE_LATEST}).",
                "content": {CONTENT_TYPE_LATEST.partition(";")[0]: {"schema": {"type": "string"}}},
            }
        },
    )
}
