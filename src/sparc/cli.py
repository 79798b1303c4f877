"""The `sparc` command: `sparc serve` and `sparc migrate`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from types import FrameType

from sparc.database import DatabaseClient, DatabaseUnavailable
from sparc.embedded import embedded_postgres
from sparc.health import WORKERS_VARIABLE
from sparc.migrations import upgrade
from sparc.settings import Settings, SettingsError, load_settings

logger = logging.getLogger("sparc")

# prometheus_client's own variable. It must be set before prometheus_client is first imported,
# so this module does not import sparc.metrics.
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class MigrationFailed(Exception):
    """`alembic upgrade head` failed; nothing of the failed revision was applied."""


class _Stop(Exception):
    """SIGTERM or SIGINT arrived: unwind so the embedded PostgreSQL is stopped on the way out."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparc", description="SPARC auth service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="apply migrations, then serve HTTP")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port to bind (default 8000)")
    serve.add_argument("--workers", type=_positive, default=1, help="worker processes (default 1)")
    commands.add_parser("migrate", help="apply database migrations and exit")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"sparc: {exc}", file=sys.stderr)
        return 2
    try:
        with _stop_on_signals(), _database(settings) as settings:
            if args.command == "migrate":
                return 0
            return _serve(settings, host=args.host, port=args.port, workers=args.workers)
    except _Stop:
        return 0
    except (DatabaseUnavailable, MigrationFailed) as exc:
        print(f"sparc: {exc}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _database(settings: Settings) -> Iterator[Settings]:
    """Resolve the database (starting the embedded one if needed), check it, migrate it."""
    with contextlib.ExitStack() as stack:
        if settings.database_url is None:
            url = stack.enter_context(embedded_postgres(settings.data_dir))
            settings = settings.with_database_url(url)
        asyncio.run(_check_reachable(settings))
        assert settings.database_url is not None
        try:
            upgrade(settings.database_url)
        except Exception as exc:
            raise MigrationFailed(
                f"migrating {settings.masked_database_url} failed: {exc}"
            ) from None
        logger.info("database schema is up to date (%s)", settings.masked_database_url)
        yield settings


async def _check_reachable(settings: Settings) -> None:
    async with DatabaseClient(settings):
        pass


def _serve(settings: Settings, *, host: str, port: int, workers: int) -> int:
    import uvicorn

    # Workers build their app from the environment: point them at the resolved database.
    assert settings.database_url is not None
    os.environ["DATABASE_URL"] = settings.database_url
    os.environ[WORKERS_VARIABLE] = str(workers)
    with contextlib.ExitStack() as stack:
        if not os.environ.get(MULTIPROCESS_DIR_VARIABLE):
            # Each worker writes its metrics here, so /metrics on any worker reports them all.
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="sparc-metrics-"))
            os.environ[MULTIPROCESS_DIR_VARIABLE] = directory
        uvicorn.run(
            "sparc.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            lifespan="on",
            proxy_headers=False,
        )
    return 0


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
