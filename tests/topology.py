"""The reference topology of deploy/, run from its files: nginx, `sparc serve` instances, PgBouncer.

Each file is used as shipped, except for the strings a test must change (ports, file paths, the
database and its credentials): `deployed()` replaces each of those, and fails when one does not
occur in the file exactly once, so the files cannot drift from what the tests run.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tests.conftest import REPO_ROOT
from tests.pgbouncer import (
    pgbouncer_executable,
    run_as_user,
    server_address,
    started,
)
from tests.processes import free_port, poll, sparc_env
from tests.programs import debian_program, running_program

DEPLOY = REPO_ROOT / "deploy"
# CI installs nginx and sets this, so a missing binary fails there instead of skipping.
REQUIRE_NGINX_VARIABLE = "SPARC_REQUIRE_NGINX"
# The password of the test's PgBouncer user (its userlist holds it in the clear).
BOUNCER_PASSWORD = "topology-test-password"
# What the shipped units call SPARC, and the directory they run it in.
SHIPPED_SPARC = "/opt/sparc/venv/bin/sparc"
SHIPPED_WORKING_DIRECTORY = "WorkingDirectory=/opt/sparc"


def deployed(relative: str, replacements: Mapping[str, str]) -> str:
    """deploy/`relative` with each key of `replacements` replaced by its value."""
    text = (DEPLOY / relative).read_text()
    for old, new in replacements.items():
        found = text.count(old)
        assert found == 1, f"deploy/{relative} holds {old!r} {found} times, the test expects once"
        text = text.replace(old, new)
    return text


def private_directory(stack: contextlib.ExitStack, prefix: str) -> Path:
    """A directory that the unprivileged users PgBouncer and nginx's workers run as (when the
    tests run as root) can reach: pytest's own are private to root."""
    path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    path.chmod(0o755)
    return path


# PgBouncer: deploy/pgbouncer/pgbouncer.ini.


@dataclass(frozen=True)
class DeployedPgBouncer:
    port: int
    user: str
    log: Path

    @property
    def database_url(self) -> str:
        """What the instances' DATABASE_URL is: the `sparc` database alias of this PgBouncer."""
        return f"postgresql://{self.user}:{BOUNCER_PASSWORD}@127.0.0.1:{self.port}/sparc"


@contextlib.contextmanager
def running_deployed_pgbouncer(database_url: str) -> Iterator[DeployedPgBouncer]:
    """deploy/pgbouncer/pgbouncer.ini in front of the database of `database_url`."""
    executable = pgbouncer_executable()
    host, server_port, socket_dir = server_address(database_url)
    database = urlsplit(database_url).path.lstrip("/")
    user = urlsplit(database_url).username or "postgres"
    port = free_port()
    with contextlib.ExitStack() as stack:
        directory = private_directory(stack, "sparc-topology-pgbouncer-")
        log = directory / "pgbouncer.log"
        config = deployed(
            "pgbouncer/pgbouncer.ini",
            {
                "sparc = host=127.0.0.1 port=5432 dbname=sparc": (
                    f"sparc = host={host} port={server_port} dbname={database}"
                ),
                "listen_port = 6432": f"listen_port = {port}",
                "unix_socket_dir = /var/run/postgresql": "unix_socket_dir =",
                "logfile = /var/log/postgresql/pgbouncer.log": f"logfile = {log}",
                "pidfile = /var/run/postgresql/pgbouncer.pid": f"pidfile = {directory}/pid",
                "auth_file = /etc/pgbouncer/userlist.txt": f"auth_file = {directory}/userlist.txt",
            },
        )
        run_as = run_as_user(socket_dir)
        if run_as is not None:  # PgBouncer refuses to run as root (Debian's unit sets postgres)
            config += f"user = {run_as}\n"
        (directory / "pgbouncer.ini").write_text(config)
        # The test's servers trust local connections: PgBouncer checks the client's SCRAM
        # against this password and logs in to the server without one.
        (directory / "userlist.txt").write_text(f'"{user}" "{BOUNCER_PASSWORD}"\n')
        with started(executable, directory / "pgbouncer.ini", port=port, log=log, run_as=run_as):
            yield DeployedPgBouncer(port=port, user=user, log=log)


# `sparc serve`: deploy/systemd/sparc@.service with deploy/systemd/sparc.env.


def unit_values(text: str, section: str) -> list[tuple[str, str]]:
    """The `key=value` lines of a systemd unit's `[section]`, in order (keys may repeat)."""
    values: list[tuple[str, str]] = []
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            values.append((key.strip(), value.strip()))
    return values


def environment_file(text: str) -> dict[str, str]:
    """The variables of a systemd EnvironmentFile (`KEY=value` lines, `#` comments)."""
    lines = [line.strip() for line in text.splitlines()]
    pairs = [line.partition("=") for line in lines if line and not line.startswith("#")]
    return {key: value for key, _, value in pairs}


@dataclass
class Instance:
    """One `sparc serve` as systemd runs sparc@<port>.service: its command and environment."""

    port: int
    command: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[str] | None = field(default=None, repr=False)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """How nginx names this instance in $upstream_addr."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        # Appended to, as the journal would be: a restarted instance's log follows the first.
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.log.parent,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def wait_ready(self, timeout: float = 120) -> dict[str, object]:
        """/readyz's answer once it is 200; fails with the instance's log if it exits first."""
        assert self.process is not None
        try:
            ready: dict[str, object] = poll(
                f"{self.base}/readyz", process=self.process, timeout=timeout
            ).json()
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log.read_text()}") from None
        return ready

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as systemd's KillSignal; the exit code once it has exited."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def installed_sparc() -> str:
    """This environment's `sparc`, which stands in for the units' /opt/sparc/venv/bin/sparc."""
    return str(Path(sys.executable).parent / "sparc")


def exec_start(unit: str, instance: str = "") -> list[str]:
    """The unit's ExecStart for `instance` (%i), running this environment's `sparc`."""
    (command,) = [value for key, value in unit_values(unit, "Service") if key == "ExecStart"]
    program, *arguments = shlex.split(command.replace("%i", instance))
    assert program == SHIPPED_SPARC, command
    return [installed_sparc(), *arguments]


def run_migrate_unit(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """deploy/systemd/sparc-migrate.service's ExecStart, run to its end with `env`."""
    unit = (DEPLOY / "systemd" / "sparc-migrate.service").read_text()
    return subprocess.run(
        exec_start(unit), env=env, cwd=cwd, capture_output=True, text=True, timeout=330
    )


def instances(bouncer: DeployedPgBouncer, count: int, directory: Path) -> list[Instance]:
    """`count` instances as sparc@.service starts them, each on a port of its own, DATABASE_URL
    pointing at `bouncer`."""
    unit = (DEPLOY / "systemd" / "sparc@.service").read_text()
    shipped_url = "DATABASE_URL=postgresql://sparc:change-me@127.0.0.1:6432/sparc"
    settings = environment_file(
        deployed("systemd/sparc.env", {shipped_url: f"DATABASE_URL={bouncer.database_url}"})
    )
    # systemd: Environment= first, then EnvironmentFile= on top of it.
    env = sparc_env()
    for key, value in unit_values(unit, "Service"):
        if key == "Environment":
            name, _, setting = value.partition("=")
            env[name] = setting
    env.update(settings)
    # The unit's StateDirectory, a path the test replaces like the others: one of its own.
    assert env["SPARC_DATA_DIR"] == "/var/lib/sparc", env.get("SPARC_DATA_DIR")
    env["SPARC_DATA_DIR"] = str(directory / "state")
    made = []
    for _ in range(count):
        port = free_port()
        workdir = directory / f"sparc@{port}"
        workdir.mkdir()
        made.append(Instance(port, exec_start(unit, str(port)), dict(env), workdir / "log"))
    return made


@contextlib.contextmanager
def stopped_at_exit(started_instances: list[Instance]) -> Iterator[list[Instance]]:
    try:
        yield started_instances
    finally:
        for instance in started_instances:
            if instance.process is not None and instance.process.poll() is None:
                try:
                    instance.stop()
                except subprocess.TimeoutExpired:
                    instance.kill()


# nginx: deploy/nginx/sparc.conf inside a main configuration of the test's own (what Debian's
# /etc/nginx/nginx.conf is in production).


@dataclass(frozen=True)
class Nginx:
    port: int
    access_log: Path
    error_log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def nginx_executable() -> str:
    return debian_program("nginx", package="nginx", require_variable=REQUIRE_NGINX_VARIABLE)


def _main_config(directory: Path) -> str:
    """The nginx.conf around the site: runs in the foreground, everything under `directory`."""
    # Two workers, as Debian's `worker_processes auto` runs on two cores: each has connections
    # of its own, and without the site's upstream `zone`, its own view of which instances are up.
    lines = ["daemon off;", "worker_processes 2;", f"pid {directory}/nginx.pid;"]
    lines.append(f"error_log {directory}/error.log notice;")
    if os.geteuid() == 0:  # workers drop to an unprivileged user, as Debian's www-data
        lines.append(f"user nobody {grp.getgrgid(pwd.getpwnam('nobody').pw_gid).gr_name};")
    lines.append("events { worker_connections 1024; }")
    lines.append("http {")
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        lines.append(f"    {kind}_temp_path {directory}/{kind};")
    lines += [f"    include {directory}/sparc.conf;", "}"]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def running_nginx(upstreams: list[Instance]) -> Iterator[Nginx]:
    """deploy/nginx/sparc.conf balancing over the two `upstreams`."""
    executable = nginx_executable()
    first, second = upstreams
    port = free_port()
    with contextlib.ExitStack() as stack:
        directory = private_directory(stack, "sparc-topology-nginx-")
        site = deployed(
            "nginx/sparc.conf",
            {
                "listen 80;": f"listen 127.0.0.1:{port};",
                "server 127.0.0.1:8001 ": f"server {first.address} ",
                "server 127.0.0.1:8002 ": f"server {second.address} ",
                "access_log /var/log/nginx/sparc.access.log": (
                    f"access_log {directory}/access.log"
                ),
            },
        )
        (directory / "sparc.conf").write_text(site)
        (directory / "nginx.conf").write_text(_main_config(directory))
        nginx = Nginx(port, directory / "access.log", directory / "error.log")
        command = [executable, "-p", str(directory), "-c", str(directory / "nginx.conf")]
        command += ["-e", str(nginx.error_log)]  # also for what it logs before reading the config
        with running_program(command, port=port, log=nginx.error_log, within=30):
            yield nginx
