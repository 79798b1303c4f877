"""A real PgBouncer, in transaction mode, in front of the tests' PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

from tests.processes import free_port, missing_program

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


def _executable() -> str:
    # Debian installs it in /usr/sbin, which a non-root PATH often lacks.
    candidates = (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
    found = next((path for path in candidates if path and os.access(path, os.X_OK)), None)
    if found is None:
        missing_program(
            "pgbouncer is not installed (Debian: apt-get install pgbouncer)",
            required_by=REQUIRE_VARIABLE,
        )
    return found


def _run_as(socket_dir: str | None) -> str | None:
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
    executable = _executable()
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
    server = urlsplit(server_url)
    socket_dir = parse_qs(server.query).get("host", [None])[0]
    host = socket_dir or server.hostname or "127.0.0.1"
    user = server.username or "postgres"
    port = free_port()
    log = directory / "pgbouncer.log"
    (directory / "users.txt").write_text(f'"{user}" ""\n')
    run_as = _run_as(socket_dir)
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
    lines = ["[databases]", f"* = host={host} port={server.port or 5432}", "[pgbouncer]"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    config = directory / "pgbouncer.ini"
    config.write_text("\n".join(lines) + "\n")
    if run_as is not None:
        entry = pwd.getpwnam(run_as)
        for path in (directory, *directory.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    process = subprocess.Popen(
        [executable, str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_until_listening(process, port, log)
        yield PgBouncer(port=port, pool_size=pool_size, log=log)
    finally:
        process.terminate()
        try:
            process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def _wait_until_listening(process: subprocess.Popen[str], port: int, log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _, stderr = process.communicate()
            shown = log.read_text() if log.exists() else ""
            raise AssertionError(f"pgbouncer exited with {process.returncode}: {stderr}{shown}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.02)
    raise AssertionError("pgbouncer did not start listening within 10 s")
