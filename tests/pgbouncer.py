"""A real PgBouncer, in transaction mode, in front of the tests' PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import pwd
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

from tests.processes import free_port
from tests.programs import debian_program, running_program

# CI installs pgbouncer and sets this, so a missing binary fails there instead of skipping.
REQUIRE_VARIABLE = "SPARC_REQUIRE_PGBOUNCER"


@dataclass(frozen=True)
class PgBouncer:
    port: int
    pool_size: int
    log: Path

    def url_for(self, database_url: str) -> str:
        """`database_url`'s database and user, reached through this PgBouncer."""
        parts = urlsplit(database_url)
        user = parts.username or "postgres"
        return urlunsplit(("postgresql", f"{user}@127.0.0.1:{self.port}", parts.path, "", ""))


def pgbouncer_executable() -> str:
    return debian_program("pgbouncer", package="pgbouncer", require_variable=REQUIRE_VARIABLE)


def run_as_user(socket_dir: str | None) -> str | None:
    """PgBouncer refuses to run as root: as root, name a user it can switch to.

    That user must reach the server: for a Unix socket, the owner of the socket's directory.
    """
    if os.geteuid() != 0:
        return None
    if socket_dir is not None:
        owner = pwd.getpwuid(os.stat(socket_dir).st_uid).pw_name
        if owner != "root":
            return owner
    return "nobody"


@contextlib.contextmanager
def running_pgbouncer(
    server_url: str, *, pool_size: int, **options: str | int
) -> Iterator[PgBouncer]:
    """Start PgBouncer (transaction mode, `pool_size` server connections per database);
    `options` are further pgbouncer.ini settings."""
    executable = pgbouncer_executable()
    # Not under pytest's tmp_path: as root, PgBouncer runs as another user, who must be able
    # to reach its files, and pytest's directories are private to root.
    with tempfile.TemporaryDirectory(prefix="sparc-pgbouncer-") as name:
        yield from _run(executable, server_url, Path(name), pool_size, options)


def _run(
    executable: str,
    server_url: str,
    directory: Path,
    pool_size: int,
    options: dict[str, str | int],
) -> Iterator[PgBouncer]:
    host, server_port, socket_dir = server_address(server_url)
    user = urlsplit(server_url).username or "postgres"
    port = free_port()
    log = directory / "pgbouncer.log"
    (directory / "users.txt").write_text(f'"{user}" ""\n')
    run_as = run_as_user(socket_dir)
    settings: dict[str, object] = {
        "listen_addr": "127.0.0.1",
        "listen_port": port,
        "unix_socket_dir": "",
        "auth_type": "trust",
        "auth_file": directory / "users.txt",
        "pool_mode": "transaction",
        "default_pool_size": pool_size,
        "max_client_conn": 1000,
        "logfile": log,
        "pidfile": directory / "pgbouncer.pid",
    }
    settings.update(options)
    if run_as is not None:
        settings["user"] = run_as
    lines = ["[databases]", f"* = host={host} port={server_port}", "[pgbouncer]"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    config = directory / "pgbouncer.ini"
    config.write_text("\n".join(lines) + "\n")
    with started(executable, config, port=port, log=log, run_as=run_as):
        yield PgBouncer(port=port, pool_size=pool_size, log=log)


def server_address(server_url: str) -> tuple[str, int, str | None]:
    """Where PgBouncer finds the server of `server_url`: host (or socket directory), port, and
    the socket directory if it is one."""
    server = urlsplit(server_url)
    socket_dir = parse_qs(server.query).get("host", [None])[0]
    return socket_dir or server.hostname or "127.0.0.1", server.port or 5432, socket_dir


@contextlib.contextmanager
def started(
    executable: str, config: Path, *, port: int, log: Path, run_as: str | None
) -> Iterator[None]:
    """Run PgBouncer with `config` (its files beside it) until the block ends."""
    if run_as is not None:
        entry = pwd.getpwnam(run_as)
        for path in (config.parent, *config.parent.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    with running_program([executable, str(config)], port=port, log=log, within=10):
        yield
