"""The `sparc` command: `sparc serve`, `migrate`, `purge`, `loadtest` and `users`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import logging.config
import os
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, cast

from sparc import admin_cli
from sparc.database import DatabaseClient, DatabaseUnavailable, QueryError
from sparc.embedded import database_settings, running_url
from sparc.logs import logging_config, resolved_log_format
from sparc.mail_messages import MailBuilder
from sparc.migrations import (
    SchemaPosition,
    head_revision,
    schema_position,
    schema_revision,
    upgrade,
)
from sparc.retention import purge
from sparc.settings import (
    METRICS_DIRECTORY_VARIABLE,
    WORKERS_VARIABLE,
    Settings,
    SettingsError,
    load_settings,
    metrics_directory,
)

if TYPE_CHECKING:  # uvicorn is imported only by `sparc serve`
    import uvicorn
    from uvicorn.supervisors import Multiprocess

logger = logging.getLogger("sparc")

# uvicorn's exit code for a server that never started (e.g. the app's startup failed).
STARTUP_FAILURE = 3


class ConnectionBudgetExceeded(Exception):
    """The pools `sparc serve` would open cannot fit in the server's connections."""


class MigrationFailed(Exception):
    """`alembic upgrade head` failed; nothing of the failed revision was applied."""


class SchemaBehind(Exception):
    """With SPARC_MIGRATE=off, the schema is older than this release's code needs."""


class _Stop(Exception):
    """SIGTERM or SIGINT arrived: unwind so the embedded PostgreSQL is stopped on the way out."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparc", description="SPARC auth service")
    parser.add_argument(
        "--version", action="version", version=f"sparc {importlib.metadata.version('sparc')}"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="apply migrations (unless SPARC_MIGRATE=off), then serve HTTP"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument(
        "--port",
        type=_port,
        default=8000,
        help="port to bind (default 8000; 0: any free one, logged once bound)",
    )
    serve.add_argument("--workers", type=_positive, default=1, help="worker processes (default 1)")
    commands.add_parser("migrate", help="apply database migrations and exit")
    commands.add_parser(
        "purge",
        help="delete expired sessions, spent throttle rows and old audit events now",
        description="The background purge of `sparc serve`, run once: prints the rows deleted "
        "per table. Waits for no other process: if one is purging, this one stops.",
    )
    loadtest = commands.add_parser(
        "loadtest",
        help="load a running SPARC and check its connection count stays bounded",
        description="Registers a throwaway user, then drives GET /auth/me (and logins) with many "
        "clients while sampling pg_stat_activity. Exits 1 if the peak exceeds the service's "
        "connection bound, or on any 5xx other than 503 or a request that got no answer.",
    )
    loadtest.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
    loadtest.add_argument("--concurrency", type=_positive, default=200, help="clients (200)")
    loadtest.add_argument("--duration", type=_seconds, default=30.0, help="seconds (30)")
    loadtest.add_argument(
        "--login-ratio", type=_ratio, default=0.0, help="share of requests that log in (0.0)"
    )
    loadtest.add_argument("--json", action="store_true", help="print the report as JSON only")
    loadtest.add_argument("--database-url", help="the service's database (default: DATABASE_URL)")
    admin_cli.add_parser(commands)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        if args.command == "serve":
            MailBuilder(settings).check_templates()
    except SettingsError as exc:
        print(f"sparc: {exc}", file=sys.stderr)
        return 2
    # The load test's own output is its report; the sampler's pool chatter would only blur it.
    level = "warning" if args.command in ("loadtest", "users") else settings.log_level
    logging.config.dictConfig(logging_config(level, resolved_log_format(settings.log_format)))
    if args.command == "loadtest":
        return _loadtest(args, settings)
    try:
        if args.command == "users":
            try:
                with _stop_on_signals():
                    return admin_cli.run(args, settings)
            except _Stop:
                return admin_cli.INTERRUPTED  # rolled back: nothing of it was kept
        if args.command == "purge":
            with _stop_on_signals(), database_settings(settings) as settings:
                return _purge(settings)
        workers = args.workers if args.command == "serve" else None
        with _stop_on_signals(), _database(settings, workers=workers) as settings:
            if args.command == "migrate":
                return 0
            return _serve(settings, host=args.host, port=args.port, workers=args.workers)
    except _Stop:
        return 0
    except (DatabaseUnavailable, MigrationFailed, SchemaBehind, ConnectionBudgetExceeded) as exc:
        print(f"sparc: {exc}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _database(settings: Settings, *, workers: int | None) -> Iterator[Settings]:
    """Resolve the database (starting the embedded one if needed), check it, migrate it.

    For `serve` (`workers` given) also check that the pools fit in the server's connections;
    with SPARC_MIGRATE=off, check the schema instead of migrating it."""
    with database_settings(settings) as settings:
        migrates = workers is None or settings.migrate == "auto"
        asyncio.run(_check_reachable(settings, workers, check_schema=not migrates))
        if migrates:
            assert settings.database_url is not None
            try:
                upgrade(settings.database_url)
            except Exception as exc:
                raise MigrationFailed(
                    f"migrating {settings.masked_database_url} failed: {exc}"
                ) from None
            logger.info("database schema is up to date (%s)", settings.masked_database_url)
        yield settings


async def _check_reachable(settings: Settings, workers: int | None, *, check_schema: bool) -> None:
    async with DatabaseClient(settings) as client:
        if check_schema:
            _check_schema(settings, await schema_revision(client))
        if workers is None or not settings.connection_budget_check:
            return
        budget = await client.connection_budget()
        needed = workers * settings.pool_max_size
        if needed > budget.available:
            raise ConnectionBudgetExceeded(
                f"{workers} workers x DB_POOL_MAX_SIZE={settings.pool_max_size} need {needed} "
                f"connections, but the server has {budget.available} free (max_connections="
                f"{budget.max_connections} - {budget.reserved} reserved - "
                f"{budget.held_by_others} held by other clients); lower DB_POOL_MAX_SIZE or "
                f"--workers, or set DB_CONNECTION_BUDGET_CHECK=false behind PgBouncer"
            )


def _purge(settings: Settings) -> int:
    async def purge_once() -> None:
        async with DatabaseClient(settings) as client:
            report = await purge(client, settings)
        for table, count in report.deleted.items():
            print(f"{table}: {count} {'row' if count == 1 else 'rows'} deleted")
        if report.lock_held_elsewhere:
            print("another process is purging: it deletes the rest")

    try:
        asyncio.run(purge_once())
    except QueryError as exc:
        # Most likely a schema that `sparc migrate` has not brought up to date.
        print(f"sparc: purge failed: {exc}", file=sys.stderr)
        return 1
    return 0


def _check_schema(settings: Settings, revision: str | None) -> None:
    """SPARC_MIGRATE=off: refuse a schema older than the code; serve on one that is newer,
    since every migration keeps the previous release working."""
    head = head_revision()
    position = schema_position(revision)
    found = f"is at revision {revision}" if revision else "has no revision (never migrated)"
    where = f"the schema of {settings.masked_database_url} {found}"
    if position is SchemaPosition.BEHIND:
        raise SchemaBehind(
            f"{where}, behind this release's {head}: run `sparc migrate` first (SPARC_MIGRATE=off)"
        )
    if position is SchemaPosition.AHEAD:
        logger.warning(
            "%s, which this release (head %s) does not know: a newer release has migrated it; "
            "serving on, as migrations keep the previous release working",
            where,
            head,
        )
    else:
        logger.info("%s, this release's head (SPARC_MIGRATE=off: not migrating)", where)


def _serve(settings: Settings, *, host: str, port: int, workers: int) -> int:
    import uvicorn

    from sparc.draining import DrainingHttpToolsProtocol
    from sparc.readiness import announcing_server

    # Workers build their app from the environment: point them at the resolved database.
    assert settings.database_url is not None
    os.environ["DATABASE_URL"] = settings.database_url
    os.environ[WORKERS_VARIABLE] = str(workers)
    with contextlib.ExitStack() as stack:
        # Each worker writes its metrics here, so /metrics on any worker reports them all.
        # prometheus_client reads it when first imported: this module does not import it.
        if metrics_directory() is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="sparc-metrics-"))
            os.environ[METRICS_DIRECTORY_VARIABLE] = directory
        config = uvicorn.Config(
            "sparc.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            lifespan="on",
            # Each worker, and uvicorn's own lines, log as this process does: in one format,
            # control characters escaped.
            log_config=logging_config(settings.log_level, resolved_log_format(settings.log_format)),
            # SPARC's own access log (sparc.access_log) replaces uvicorn's.
            access_log=False,
            proxy_headers=False,
            # At shutdown, keep-alive connections close after an answer or by their client,
            # never under a request a proxy is sending (see sparc.draining).
            http=DrainingHttpToolsProtocol,
            # On SIGTERM: stop accepting, let in-flight requests finish for this long, then
            # cancel them (their transactions roll back) and close the pool. uvicorn types it
            # int, but any number of seconds works.
            timeout_graceful_shutdown=cast(int, settings.shutdown_grace),
        )
        if workers == 1:
            server = announcing_server(config)
            server.run()
            return 0 if server.started else STARTUP_FAILURE
        _supervisor(config).run()
    return 0


def _supervisor(config: uvicorn.Config) -> Multiprocess:
    """uvicorn's supervisor of `--workers N`, refusing new connections as soon as it stops.

    uvicorn's own keeps the listening socket open in the parent until every worker has finished
    its grace period; meanwhile new connections pile up unanswered in the kernel's backlog. Once
    the parent and every worker have closed their copy, new connections are refused at once.
    """
    from uvicorn.supervisors import Multiprocess

    from sparc import readiness

    bound = config.bind_socket()
    port = bound.getsockname()[1]

    class Supervisor(Multiprocess):
        announced = False

        def terminate_all(self) -> None:
            for listening in self.sockets:
                listening.close()
            super().terminate_all()

        def keep_subprocess_alive(self) -> None:
            super().keep_subprocess_alive()
            if not self.announced and readiness.listening(config.host, port):
                self.announced = True
                readiness.announce_ready(config.host, port)

    return Supervisor(config, sockets=[bound])


def _loadtest(args: argparse.Namespace, settings: Settings) -> int:
    from sparc.loadtest import LoadtestError
    from sparc.loadtest_report import run_with_display

    # Without a URL: the embedded PostgreSQL that `sparc serve` runs in the same SPARC_DATA_DIR.
    url = args.database_url or settings.database_url or running_url(settings.data_dir)
    if url is None:
        print(
            "sparc: loadtest needs the service's database to count its connections: no "
            f"embedded PostgreSQL runs in {settings.data_dir} (SPARC_DATA_DIR); start `sparc "
            "serve` there first, or pass --database-url or set DATABASE_URL",
            file=sys.stderr,
        )
        return 2
    try:
        database_settings = settings.with_database_url(url)
    except SettingsError as exc:
        print(f"sparc: {str(exc).replace('DATABASE_URL', '--database-url', 1)}", file=sys.stderr)
        return 2
    try:
        report = run_with_display(args, database_settings)
    except (LoadtestError, DatabaseUnavailable) as exc:
        print(f"sparc: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0 if report.passed else 1


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
