"""Settings: every environment variable SPARC reads, parsed and validated once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from email.utils import parseaddr
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import platformdirs
from environs import Env

from sparc._settings_reader import IPNetwork as IPNetwork
from sparc._settings_reader import Reader
from sparc._settings_reader import SettingsError as SettingsError

# Set by `sparc serve` for its workers, so each can state the service's whole connection bound.
WORKERS_VARIABLE = "SPARC_WORKERS"
# prometheus_client's own: where every worker writes its metrics. prometheus_client reads it when
# first imported, so `sparc serve` sets it before that.
METRICS_DIRECTORY_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
ALLOWED_URL_SCHEMES = ("postgresql", "postgresql+asyncpg")
# SPARC_SMTP_URL: smtp:// (plain for a relay; STARTTLS, required, when the URL carries a user)
# or smtps:// (TLS from the first byte).
SMTP_URL_SCHEMES = ("smtp", "smtps")
DEFAULT_MAIL_FROM = "SPARC <sparc@localhost>"
DEFAULT_PUBLIC_URL = "http://localhost:8000"
# DB_COMMAND_TIMEOUT's default: this much longer than DB_STATEMENT_TIMEOUT, or this long when
# the statement timeout is off.
COMMAND_TIMEOUT_MARGIN = 2.0
COMMAND_TIMEOUT_WITHOUT_STATEMENT_TIMEOUT = 60.0
DEFAULT_DATA_DIR = Path(platformdirs.user_data_dir("sparc"))
DEFAULT_HASH_CONCURRENCY = os.cpu_count() or 1
# SPARC_MIGRATE: "auto" lets `sparc serve` migrate before it serves; with "off" migrating is a
# release step of its own (`sparc migrate`) and `sparc serve` only checks the schema.
MigrateMode = Literal["auto", "off"]
MIGRATE_MODES: tuple[MigrateMode, ...] = ("auto", "off")
# SPARC_LOG_FORMAT: lines for people, or one JSON object per line for a log pipeline.
LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True, slots=True)
class Settings:
    # None means "start the embedded PostgreSQL under data_dir".
    database_url: str | None = None
    pool_min_size: int = 1
    pool_max_size: int = 10
    pool_timeout: float = 5.0
    connect_timeout: float = 5.0
    # 0 turns the server-side statement_timeout off.
    statement_timeout: float = 30.0
    # The client-side deadline of every statement (a frozen server cannot cancel anything);
    # None: DB_STATEMENT_TIMEOUT + 2 s, or 60 s when that is off. See `command_deadline`.
    command_timeout: float | None = None
    # A connection whose peer stops answering (a partition: packets dropped, no reset) is given
    # up after about this long, idle or not: TCP keepalives and TCP_USER_TIMEOUT on both ends.
    # 0 turns them off.
    dead_peer_timeout: float = 30.0
    pool_max_idle: float = 300.0
    # asyncpg's per-connection cache of prepared statements; 0 behind PgBouncer.
    statement_cache_size: int = 100
    # DATABASE_URL points at PgBouncer in transaction mode: each transaction may run on another
    # server connection, so nothing may rely on session state (startup settings, prepared
    # statements) beyond one transaction.
    pgbouncer: bool = False
    # 0 = unbounded: every request may queue for a connection (up to DB_POOL_TIMEOUT).
    pool_max_waiting: int = 0
    # Server-side backstop for a transaction left open by a bug; 0 turns it off.
    idle_in_transaction_timeout: float = 60.0
    # Refuse to start when workers x DB_POOL_MAX_SIZE cannot fit in the server's free
    # connections; turn off behind PgBouncer, whose clients are not server connections.
    connection_budget_check: bool = True
    # Replays of a request that failed with serialization_failure or deadlock_detected.
    retry_attempts: int = 3
    # On SIGTERM: how long in-flight requests may run on before they are cancelled.
    shutdown_grace: float = 25.0
    migrate: MigrateMode = "auto"
    # How long a migration waits for another instance's to finish before it gives up.
    migration_lock_timeout: float = 300.0
    data_dir: Path = DEFAULT_DATA_DIR
    token_ttl: float = 12 * 3600.0
    token_idle_timeout: float = 30 * 60.0
    login_max_failures: int = 5
    login_window: float = 15 * 60.0
    login_ip_max_failures: int = 50
    # Failed logins for one account from all addresses together, within the window.
    login_account_max_failures: int = 100
    # Registrations from one client address within the window.
    registration_ip_max: int = 20
    # Peers whose X-Forwarded-For is believed: a load balancer's or reverse proxy's addresses.
    trusted_proxies: tuple[IPNetwork, ...] = ()
    hash_concurrency: int = DEFAULT_HASH_CONCURRENCY
    # OWASP's Argon2id profile (m=19 MiB, t=2, p=1); see the README for why.
    argon2_time_cost: int = 2
    argon2_memory_kib: int = 19 * 1024
    argon2_parallelism: int = 1
    # Audit events (IP addresses, user agents: personal data) older than this are purged.
    audit_retention: float = 365 * 86400.0
    # How often each `sparc serve` process tries a purge; one process at a time does the work.
    purge_interval: float = 600.0
    # Password-reset requests from one client address within the login window.
    password_reset_ip_max: int = 20
    # None: mail is written as .eml files under data_dir/mail/. Never in a repr: it may hold
    # the SMTP password (see masked_smtp_url).
    smtp_url: str | None = field(default=None, repr=False)
    mail_from: str = DEFAULT_MAIL_FROM
    # Each step of an SMTP conversation (connect, TLS, login, each command) gets this long.
    smtp_timeout: float = 10.0
    # A directory whose templates replace the shipped ones of the same name.
    mail_templates: Path | None = None
    # The front end that handles the links in mails (/reset-password, /verify-email).
    public_url: str = DEFAULT_PUBLIC_URL
    password_reset_ttl: float = 3600.0
    email_verify_ttl: float = 86400.0
    require_verified_email: bool = False
    # The first retry of a failed delivery waits this long, each further one twice as long.
    mail_retry_delay: float = 60.0
    # One line per request (sparc.access_log).
    access_log: bool = True
    # None: text when stderr is a terminal, JSON otherwise (sparc.logs.resolved_log_format).
    log_format: LogFormat | None = None
    log_level: LogLevel = "info"

    def __post_init__(self) -> None:
        if self.database_url is not None:
            check_database_url(self.database_url, variable="DATABASE_URL")
        if self.argon2_memory_kib < 8 * self.argon2_parallelism:
            raise SettingsError(
                f"SPARC_ARGON2_MEMORY_KIB={self.argon2_memory_kib} is below Argon2's minimum of "
                f"8 KiB per lane (SPARC_ARGON2_PARALLELISM={self.argon2_parallelism})"
            )
        if self.pgbouncer and self.statement_cache_size:
            raise SettingsError(
                f"DB_STATEMENT_CACHE_SIZE={self.statement_cache_size} must be 0 with "
                "DB_PGBOUNCER=true: PgBouncer's transaction mode gives each transaction any "
                "server connection, where asyncpg's cached prepared statements do not exist"
            )
        if self.command_timeout is not None and self.command_timeout <= self.statement_timeout:
            raise SettingsError(
                f"DB_COMMAND_TIMEOUT={self.command_timeout:g}s must be longer than "
                f"DB_STATEMENT_TIMEOUT={self.statement_timeout:g}s, so that PostgreSQL cancels a "
                "slow statement before SPARC has to cut its connection"
            )
        if self.smtp_url is not None:
            check_smtp_url(self.smtp_url)
        if "@" not in parseaddr(self.mail_from)[1]:
            raise SettingsError(
                f"SPARC_MAIL_FROM={self.mail_from!r} is not an address "
                "(e.g. sparc@example.org or 'SPARC <sparc@example.org>')"
            )
        public = urlsplit(self.public_url)
        if public.scheme not in ("http", "https") or not public.netloc:
            raise SettingsError(
                f"SPARC_PUBLIC_URL={self.public_url!r} must be an http:// or https:// URL"
            )
        if self.pool_min_size > self.pool_max_size:
            raise SettingsError(
                f"DB_POOL_MIN_SIZE={self.pool_min_size} is larger than "
                f"DB_POOL_MAX_SIZE={self.pool_max_size}: the minimum must not exceed the maximum"
            )

    @property
    def command_deadline(self) -> float:
        """Seconds SPARC waits for PostgreSQL to answer a statement before it cuts the
        connection (DB_COMMAND_TIMEOUT)."""
        if self.command_timeout is not None:
            return self.command_timeout
        if self.statement_timeout:
            return self.statement_timeout + COMMAND_TIMEOUT_MARGIN
        return COMMAND_TIMEOUT_WITHOUT_STATEMENT_TIMEOUT

    @property
    def masked_database_url(self) -> str:
        """The database URL with its password replaced, fit for logs and error messages."""
        if self.database_url is None:
            return "embedded PostgreSQL in " + str(self.data_dir)
        return mask_password(self.database_url)

    @property
    def masked_smtp_url(self) -> str:
        """SPARC_SMTP_URL with its password replaced, fit for logs and error messages."""
        if self.smtp_url is None:
            return "no SMTP server: mail goes to " + str(self.data_dir / "mail")
        return mask_password(self.smtp_url)

    def with_database_url(self, url: str) -> Settings:
        """A copy of these settings pointing at `url` (used once the embedded server is up)."""
        return replace(self, database_url=url)


def mask_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0] + ":***"
    return urlunsplit(parts._replace(netloc=userinfo + "@" + netloc[1]))


def database_hosts(url: str) -> list[str]:
    """The `host:port` addresses a libpq-style URL names: one, or several for failover
    (`postgresql://u@db1:5432,db2:5432/app`); a Unix socket URL names none."""
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    hosts = []
    for address in netloc.split(","):
        if not address:
            continue
        # Parsed as a URL of its own, so IPv6 literals ([::1]:5432) and bad ports are handled.
        parts = urlsplit(f"//{address}")
        parts.port  # noqa: B018 - urlsplit only validates the port when it is read
        if parts.hostname is None:
            continue  # no host: the Unix socket (postgresql://u@:5433/db)
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        hosts.append(f"{host}:{parts.port or 5432}")
    return hosts


def check_database_url(url: str, *, variable: str) -> None:
    shown = mask_password(url) if "://" in url else url
    try:
        parts = urlsplit(url)
        database_hosts(url)  # every host's port must be a port
    except ValueError as exc:
        raise SettingsError(f"{variable}={shown!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ALLOWED_URL_SCHEMES:
        raise SettingsError(
            f"{variable}={shown!r} must start with postgresql:// or postgresql+asyncpg://"
        )
    if not parts.path.strip("/"):
        raise SettingsError(f"{variable}={shown!r} names no database (postgresql://host/DBNAME)")


def check_smtp_url(url: str) -> None:
    shown = mask_password(url) if "://" in url else "***"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise SettingsError(f"SPARC_SMTP_URL={shown!r} is not a valid URL: {exc}") from None
    if parts.scheme not in SMTP_URL_SCHEMES:
        raise SettingsError(f"SPARC_SMTP_URL={shown!r} must start with smtp:// or smtps://")
    if not parts.hostname:
        raise SettingsError(f"SPARC_SMTP_URL={shown!r} names no host (smtp://host:587)")
    if port == 0:
        raise SettingsError(f"SPARC_SMTP_URL={shown!r} has port 0")


def load_settings(
    environ: Mapping[str, str] | None = None, *, read_dotenv: bool = True
) -> Settings:
    """Read the settings from `environ` (default: the process environment, then ./.env).

    Raises SettingsError, whose one-line message names the variable and the bad value.
    """
    if environ is None:
        env = Env(expand_vars=False)
        if read_dotenv:
            # Values already in the process environment win over the file.
            env.read_env(str(Path.cwd() / ".env"), recurse=False)
        reader = Reader(lambda name: env.str(name, None))
    else:
        reader = Reader(environ.get)
    pgbouncer = reader.boolean("DB_PGBOUNCER", False)
    return Settings(
        database_url=reader.optional_str("DATABASE_URL"),
        pool_min_size=reader.integer("DB_POOL_MIN_SIZE", 1, minimum=0),
        pool_max_size=reader.integer("DB_POOL_MAX_SIZE", 10, minimum=1),
        pool_timeout=reader.seconds("DB_POOL_TIMEOUT", 5.0, allow_zero=False),
        connect_timeout=reader.seconds("DB_CONNECT_TIMEOUT", 5.0, allow_zero=False),
        statement_timeout=reader.seconds("DB_STATEMENT_TIMEOUT", 30.0, allow_zero=True),
        command_timeout=reader.optional_seconds("DB_COMMAND_TIMEOUT"),
        dead_peer_timeout=reader.seconds("DB_DEAD_PEER_TIMEOUT", 30.0, allow_zero=True),
        pool_max_idle=reader.seconds("DB_POOL_MAX_IDLE", 300.0, allow_zero=True),
        statement_cache_size=reader.integer(
            "DB_STATEMENT_CACHE_SIZE", 0 if pgbouncer else 100, minimum=0
        ),
        pgbouncer=pgbouncer,
        pool_max_waiting=reader.integer("DB_POOL_MAX_WAITING", 0, minimum=0),
        idle_in_transaction_timeout=reader.seconds(
            "DB_IDLE_IN_TRANSACTION_TIMEOUT", 60.0, allow_zero=True
        ),
        # Behind PgBouncer the pools are PgBouncer's clients, not server connections.
        connection_budget_check=reader.boolean("DB_CONNECTION_BUDGET_CHECK", not pgbouncer),
        retry_attempts=reader.integer("DB_RETRY_ATTEMPTS", 3, minimum=0),
        shutdown_grace=reader.seconds("SPARC_SHUTDOWN_GRACE", 25.0, allow_zero=True),
        migrate=reader.choice("SPARC_MIGRATE", MIGRATE_MODES, "auto"),
        migration_lock_timeout=reader.seconds(
            "SPARC_MIGRATION_LOCK_TIMEOUT", 300.0, allow_zero=False
        ),
        data_dir=reader.path("SPARC_DATA_DIR", DEFAULT_DATA_DIR),
        token_ttl=reader.seconds("SPARC_TOKEN_TTL", 12 * 3600.0, allow_zero=False),
        token_idle_timeout=reader.seconds("SPARC_TOKEN_IDLE_TIMEOUT", 1800.0, allow_zero=False),
        login_max_failures=reader.integer("SPARC_LOGIN_MAX_FAILURES", 5, minimum=1),
        login_window=reader.seconds("SPARC_LOGIN_WINDOW", 900.0, allow_zero=False),
        login_ip_max_failures=reader.integer("SPARC_LOGIN_IP_MAX_FAILURES", 50, minimum=1),
        login_account_max_failures=reader.integer(
            "SPARC_LOGIN_ACCOUNT_MAX_FAILURES", 100, minimum=1
        ),
        registration_ip_max=reader.integer("SPARC_REGISTRATION_IP_MAX", 20, minimum=1),
        trusted_proxies=reader.networks("SPARC_TRUSTED_PROXIES"),
        hash_concurrency=reader.integer(
            "SPARC_HASH_CONCURRENCY", DEFAULT_HASH_CONCURRENCY, minimum=1
        ),
        argon2_time_cost=reader.integer("SPARC_ARGON2_TIME_COST", 2, minimum=1),
        argon2_memory_kib=reader.integer("SPARC_ARGON2_MEMORY_KIB", 19 * 1024, minimum=8),
        argon2_parallelism=reader.integer("SPARC_ARGON2_PARALLELISM", 1, minimum=1),
        audit_retention=reader.seconds("SPARC_AUDIT_RETENTION", 365 * 86400.0, allow_zero=False),
        purge_interval=reader.seconds("SPARC_PURGE_INTERVAL", 600.0, allow_zero=False),
        password_reset_ip_max=reader.integer("SPARC_PASSWORD_RESET_IP_MAX", 20, minimum=1),
        smtp_url=reader.optional_str("SPARC_SMTP_URL"),
        mail_from=reader.optional_str("SPARC_MAIL_FROM") or DEFAULT_MAIL_FROM,
        smtp_timeout=reader.seconds("SPARC_SMTP_TIMEOUT", 10.0, allow_zero=False),
        mail_templates=reader.directory("SPARC_MAIL_TEMPLATES"),
        public_url=(reader.optional_str("SPARC_PUBLIC_URL") or DEFAULT_PUBLIC_URL).rstrip("/"),
        password_reset_ttl=reader.seconds("SPARC_PASSWORD_RESET_TTL", 3600.0, allow_zero=False),
        email_verify_ttl=reader.seconds("SPARC_EMAIL_VERIFY_TTL", 86400.0, allow_zero=False),
        require_verified_email=reader.boolean("SPARC_REQUIRE_VERIFIED_EMAIL", False),
        mail_retry_delay=reader.seconds("SPARC_MAIL_RETRY_DELAY", 60.0, allow_zero=False),
        access_log=reader.boolean("SPARC_ACCESS_LOG", True),
        log_format=reader.optional_choice("SPARC_LOG_FORMAT", LOG_FORMATS),
        log_level=reader.choice("SPARC_LOG_LEVEL", LOG_LEVELS, "info"),
    )


def serve_workers(environ: Mapping[str, str] | None = None) -> int:
    """How many worker processes `sparc serve` runs this app in; 1 when it was not started so."""
    environ = os.environ if environ is None else environ
    return int(environ.get(WORKERS_VARIABLE) or 1)


def metrics_directory(environ: Mapping[str, str] | None = None) -> str | None:
    """The directory the workers share their metrics through, or None for a single process."""
    environ = os.environ if environ is None else environ
    return environ.get(METRICS_DIRECTORY_VARIABLE) or None
