"""Settings: defaults, parsing, and one clear line for every bad value."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparc.settings import (
    DEFAULT_DATA_DIR,
    Settings,
    SettingsError,
    database_hosts,
    load_settings,
)


def test_defaults() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert settings.database_url is None
    assert (settings.pool_min_size, settings.pool_max_size) == (1, 10)
    assert (settings.pool_timeout, settings.connect_timeout) == (5.0, 5.0)
    assert settings.statement_timeout == 30.0
    assert settings.pool_max_idle == 300.0
    assert settings.statement_cache_size == 100
    assert (settings.pool_max_waiting, settings.idle_in_transaction_timeout) == (0, 60.0)
    assert settings.connection_budget_check is True
    assert settings.pgbouncer is False
    assert (settings.retry_attempts, settings.shutdown_grace) == (3, 25.0)
    assert (settings.migrate, settings.migration_lock_timeout) == ("auto", 300.0)
    assert settings.data_dir == DEFAULT_DATA_DIR
    assert (settings.token_ttl, settings.token_idle_timeout) == (43200.0, 1800.0)
    assert (settings.login_max_failures, settings.login_window) == (5, 900.0)
    assert settings.login_ip_max_failures == 50
    assert (settings.argon2_time_cost, settings.argon2_memory_kib) == (2, 19456)
    assert settings.argon2_parallelism == 1
    assert (settings.audit_retention, settings.purge_interval) == (365 * 86400.0, 600.0)
    assert settings.smtp_url is None and settings.mail_templates is None
    assert (settings.mail_from, settings.smtp_timeout) == ("SPARC <sparc@localhost>", 10.0)
    assert settings.public_url == "http://localhost:8000"
    assert (settings.password_reset_ttl, settings.email_verify_ttl) == (3600.0, 86400.0)
    assert settings.require_verified_email is False
    assert (settings.mail_retry_delay, settings.password_reset_ip_max) == (60.0, 20)
    # log_format None: text when stderr is a terminal, JSON otherwise.
    assert (settings.access_log, settings.log_format, settings.log_level) == (True, None, "info")


def test_every_variable_is_read(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "DATABASE_URL": "postgresql+asyncpg://u:p@db.example:6432/app",
            "DB_POOL_MIN_SIZE": "2",
            "DB_POOL_MAX_SIZE": "20",
            "DB_POOL_TIMEOUT": "1.5",
            "DB_CONNECT_TIMEOUT": "3",
            "DB_STATEMENT_TIMEOUT": "0",
            "DB_COMMAND_TIMEOUT": "90s",
            "DB_DEAD_PEER_TIMEOUT": "1m",
            "DB_POOL_MAX_IDLE": "60",
            "DB_STATEMENT_CACHE_SIZE": "0",
            "DB_POOL_MAX_WAITING": "50",
            "DB_IDLE_IN_TRANSACTION_TIMEOUT": "2m",
            "DB_CONNECTION_BUDGET_CHECK": "off",
            "DB_PGBOUNCER": "yes",
            "DB_RETRY_ATTEMPTS": "5",
            "SPARC_SHUTDOWN_GRACE": "10s",
            "SPARC_MIGRATE": "OFF",
            "SPARC_MIGRATION_LOCK_TIMEOUT": "90s",
            "SPARC_DATA_DIR": "/srv/sparc",
            "SPARC_TOKEN_TTL": "1h",
            "SPARC_TOKEN_IDLE_TIMEOUT": "10m",
            "SPARC_LOGIN_MAX_FAILURES": "3",
            "SPARC_LOGIN_WINDOW": "5m",
            "SPARC_LOGIN_IP_MAX_FAILURES": "30",
            "SPARC_LOGIN_ACCOUNT_MAX_FAILURES": "200",
            "SPARC_REGISTRATION_IP_MAX": "7",
            "SPARC_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.7 ,2001:db8::/32",
            "SPARC_HASH_CONCURRENCY": "4",
            "SPARC_ARGON2_TIME_COST": "3",
            "SPARC_ARGON2_MEMORY_KIB": "65536",
            "SPARC_ARGON2_PARALLELISM": "4",
            "SPARC_AUDIT_RETENTION": "90d",
            "SPARC_PURGE_INTERVAL": "1m",
            "SPARC_PASSWORD_RESET_IP_MAX": "9",
            "SPARC_SMTP_URL": "smtps://mailer:pw@smtp.example:465",
            "SPARC_MAIL_FROM": "Accounts <accounts@example.org>",
            "SPARC_SMTP_TIMEOUT": "20s",
            "SPARC_MAIL_TEMPLATES": str(tmp_path),
            "SPARC_PUBLIC_URL": "https://app.example.org/",
            "SPARC_PASSWORD_RESET_TTL": "30m",
            "SPARC_EMAIL_VERIFY_TTL": "3d",
            "SPARC_REQUIRE_VERIFIED_EMAIL": "true",
            "SPARC_MAIL_RETRY_DELAY": "2m",
            "SPARC_ACCESS_LOG": "false",
            "SPARC_LOG_FORMAT": "JSON",
            "SPARC_LOG_LEVEL": "Warning",
        }
    )
    assert settings == Settings(
        database_url="postgresql+asyncpg://u:p@db.example:6432/app",
        pool_min_size=2,
        pool_max_size=20,
        pool_timeout=1.5,
        connect_timeout=3.0,
        statement_timeout=0.0,
        command_timeout=90.0,
        dead_peer_timeout=60.0,
        pool_max_idle=60.0,
        statement_cache_size=0,
        pool_max_waiting=50,
        idle_in_transaction_timeout=120.0,
        connection_budget_check=False,
        pgbouncer=True,
        retry_attempts=5,
        shutdown_grace=10.0,
        migrate="off",
        migration_lock_timeout=90.0,
        data_dir=Path("/srv/sparc"),
        token_ttl=3600.0,
        token_idle_timeout=600.0,
        login_max_failures=3,
        login_window=300.0,
        login_ip_max_failures=30,
        login_account_max_failures=200,
        registration_ip_max=7,
        trusted_proxies=(
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("192.0.2.7"),
            ipaddress.ip_network("2001:db8::/32"),
        ),
        hash_concurrency=4,
        argon2_time_cost=3,
        argon2_memory_kib=65536,
        argon2_parallelism=4,
        audit_retention=90 * 86400.0,
        purge_interval=60.0,
        password_reset_ip_max=9,
        smtp_url="smtps://mailer:pw@smtp.example:465",
        mail_from="Accounts <accounts@example.org>",
        smtp_timeout=20.0,
        mail_templates=tmp_path,
        public_url="https://app.example.org",
        password_reset_ttl=1800.0,
        email_verify_ttl=3 * 86400.0,
        require_verified_email=True,
        mail_retry_delay=120.0,
        access_log=False,
        log_format="json",
        log_level="warning",
    )


@pytest.mark.parametrize(
    ("variable", "value", "complaint"),
    [
        ("DATABASE_URL", "mysql://u@h/db", "must start with postgresql://"),
        ("DATABASE_URL", "postgres://u@h/db", "must start with postgresql://"),
        ("DATABASE_URL", "postgresql://u@h", "names no database"),
        ("DATABASE_URL", "postgresql://u@h:99999/db", "not a valid URL"),
        ("DB_POOL_MIN_SIZE", "-1", "at least 0"),
        ("DB_POOL_MIN_SIZE", "one", "not a whole number"),
        ("DB_POOL_MAX_SIZE", "0", "at least 1"),
        ("DB_POOL_MAX_SIZE", "2.5", "not a whole number"),
        ("DB_POOL_TIMEOUT", "0", "more than 0"),
        ("DB_POOL_TIMEOUT", "0ms", "more than 0"),
        ("DB_POOL_TIMEOUT", "soon", "not a duration"),
        ("DB_CONNECT_TIMEOUT", "-3", "not a duration"),
        ("DB_CONNECT_TIMEOUT", "inf", "not a duration"),
        ("DB_STATEMENT_TIMEOUT", "-1", "not a duration"),
        ("DB_STATEMENT_TIMEOUT", "5 weeks", "not a duration"),
        ("DB_COMMAND_TIMEOUT", "0", "more than 0"),
        ("DB_COMMAND_TIMEOUT", "10s", "must be longer than DB_STATEMENT_TIMEOUT=30s"),
        ("DB_DEAD_PEER_TIMEOUT", "never", "not a duration"),
        ("DATABASE_URL", "postgresql://u@db1:5432,db2:x/app", "not a valid URL"),
        ("DB_POOL_MAX_IDLE", "nan", "not a duration"),
        ("DB_STATEMENT_CACHE_SIZE", "-5", "at least 0"),
        ("DB_POOL_MAX_WAITING", "-1", "at least 0"),
        ("DB_IDLE_IN_TRANSACTION_TIMEOUT", "soon", "not a duration"),
        ("DB_CONNECTION_BUDGET_CHECK", "maybe", "not a boolean"),
        ("DB_PGBOUNCER", "transaction", "not a boolean"),
        ("DB_RETRY_ATTEMPTS", "-1", "at least 0"),
        ("SPARC_SHUTDOWN_GRACE", "a while", "not a duration"),
        ("SPARC_MIGRATE", "never", "is not one of: auto, off"),
        ("SPARC_MIGRATE", "false", "is not one of: auto, off"),
        ("SPARC_MIGRATION_LOCK_TIMEOUT", "0", "more than 0"),
        ("SPARC_MIGRATION_LOCK_TIMEOUT", "5 minutes", "not a duration"),
        ("SPARC_TOKEN_TTL", "0", "more than 0"),
        ("SPARC_TOKEN_IDLE_TIMEOUT", "forever", "not a duration"),
        ("SPARC_LOGIN_MAX_FAILURES", "0", "at least 1"),
        ("SPARC_LOGIN_WINDOW", "-15m", "not a duration"),
        ("SPARC_LOGIN_IP_MAX_FAILURES", "many", "not a whole number"),
        ("SPARC_LOGIN_ACCOUNT_MAX_FAILURES", "0", "at least 1"),
        ("SPARC_REGISTRATION_IP_MAX", "lots", "not a whole number"),
        ("SPARC_TRUSTED_PROXIES", "10.0.0.0/8, the load balancer", "not an IP address"),
        ("SPARC_HASH_CONCURRENCY", "0", "at least 1"),
        ("SPARC_ARGON2_TIME_COST", "0", "at least 1"),
        ("SPARC_ARGON2_MEMORY_KIB", "4", "at least 8"),
        ("SPARC_ARGON2_PARALLELISM", "0", "at least 1"),
        ("SPARC_AUDIT_RETENTION", "0", "more than 0"),
        ("SPARC_AUDIT_RETENTION", "a year", "not a duration"),
        ("SPARC_PURGE_INTERVAL", "0s", "more than 0"),
        ("SPARC_PURGE_INTERVAL", "-10m", "not a duration"),
        ("SPARC_PASSWORD_RESET_IP_MAX", "0", "at least 1"),
        ("SPARC_SMTP_URL", "http://mail.example", "must start with smtp:// or smtps://"),
        ("SPARC_SMTP_URL", "smtp://", "names no host"),
        ("SPARC_SMTP_URL", "smtp://mail.example:99999", "not a valid URL"),
        ("SPARC_MAIL_FROM", "nobody", "is not an address"),
        ("SPARC_SMTP_TIMEOUT", "0", "more than 0"),
        ("SPARC_MAIL_TEMPLATES", "/no/such/directory", "is not a directory"),
        ("SPARC_PUBLIC_URL", "app.example.org", "must be an http:// or https:// URL"),
        ("SPARC_PASSWORD_RESET_TTL", "0", "more than 0"),
        ("SPARC_EMAIL_VERIFY_TTL", "a day", "not a duration"),
        ("SPARC_REQUIRE_VERIFIED_EMAIL", "sometimes", "not a boolean"),
        ("SPARC_MAIL_RETRY_DELAY", "0", "more than 0"),
        ("SPARC_ACCESS_LOG", "sometimes", "not a boolean"),
        ("SPARC_LOG_FORMAT", "yaml", "is not one of: text, json"),
        ("SPARC_LOG_LEVEL", "loud", "is not one of: debug, info, warning, error, critical"),
        ("SPARC_LOG_LEVEL", "20", "is not one of: debug, info"),
    ],
)
def test_bad_value_names_the_variable_and_value(variable: str, value: str, complaint: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}=")
    assert complaint in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0),
        ("0.5", 0.5),
        ("250ms", 0.25),
        ("45s", 45.0),
        ("15m", 900.0),
        ("12h", 43200.0),
        ("1d", 86400.0),
        ("2 H", 7200.0),
    ],
)
def test_durations_take_units(text: str, seconds: float) -> None:
    assert load_settings({"SPARC_TOKEN_TTL": text}).token_ttl == seconds


def test_argon2_memory_must_cover_every_lane() -> None:
    with pytest.raises(SettingsError, match="SPARC_ARGON2_MEMORY_KIB=16 is below"):
        load_settings({"SPARC_ARGON2_MEMORY_KIB": "16", "SPARC_ARGON2_PARALLELISM": "4"})


def test_behind_pgbouncer_the_statement_cache_and_budget_check_default_to_off() -> None:
    settings = load_settings({"DB_PGBOUNCER": "true"})
    assert settings.pgbouncer is True
    assert settings.statement_cache_size == 0
    assert settings.connection_budget_check is False


def test_a_statement_cache_behind_pgbouncer_is_refused() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"DB_PGBOUNCER": "true", "DB_STATEMENT_CACHE_SIZE": "100"})
    assert str(caught.value).startswith("DB_STATEMENT_CACHE_SIZE=100 must be 0 with DB_PGBOUNCER")


def test_min_above_max_is_refused() -> None:
    with pytest.raises(SettingsError, match="DB_POOL_MIN_SIZE=5 is larger than DB_POOL_MAX_SIZE=2"):
        load_settings({"DB_POOL_MIN_SIZE": "5", "DB_POOL_MAX_SIZE": "2"})


def test_password_is_masked_in_errors_and_for_logs() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"DATABASE_URL": "mysql://admin:s3cret@h/db"})
    assert "s3cret" not in str(caught.value)
    settings = load_settings({"DATABASE_URL": "postgresql://admin:s3cret@h/db"})
    assert settings.masked_database_url == "postgresql://admin:***@h/db"
    assert "s3cret" not in repr(settings.masked_database_url)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://mailer:s3cret@smtp.example",
        "smtp://mailer:s3cret@smtp.example:99999",
        "smtp://mailer:s3cret@:587",
    ],
)
def test_the_smtp_password_is_in_no_error_nor_repr(url: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"SPARC_SMTP_URL": url})
    assert "s3cret" not in str(caught.value)
    settings = load_settings({"SPARC_SMTP_URL": "smtp://mailer:s3cret@smtp.example:587"})
    assert "s3cret" not in repr(settings)
    assert settings.masked_smtp_url == "smtp://mailer:***@smtp.example:587"


def test_dotenv_in_the_working_directory_is_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("DB_POOL_MAX_SIZE=7\nDB_POOL_TIMEOUT=2\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DB_POOL_TIMEOUT", "3")  # the real environment wins over the file
    monkeypatch.delenv("DB_POOL_MAX_SIZE", raising=False)
    settings = load_settings()
    assert settings.pool_max_size == 7
    assert settings.pool_timeout == 3.0
    os.environ.pop("DB_POOL_MAX_SIZE", None)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DB_POOL_MAX_SIZE", "lots"),
        ("DATABASE_URL", "mysql://root:pw@h/db"),
        ("DB_POOL_TIMEOUT", "-1"),
        ("SPARC_MIGRATE", "sometimes"),
        # Read before logging is set up: the line is plain, whatever the format would be.
        ("SPARC_LOG_FORMAT", "yaml"),
        ("SPARC_LOG_LEVEL", "loud"),
    ],
)
def test_sparc_stops_with_exit_2_and_one_line(tmp_path: Path, variable: str, value: str) -> None:
    env = {**os.environ, variable: value}
    for command in (["serve"], ["migrate"]):
        result = subprocess.run(
            [sys.executable, "-m", "sparc", *command],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"sparc: {variable}=")
        assert "pw@" not in lines[0]


def test_the_command_deadline_follows_the_statement_timeout_unless_set() -> None:
    assert load_settings({}).command_deadline == 32.0
    assert load_settings({"DB_STATEMENT_TIMEOUT": "5"}).command_deadline == 7.0
    assert load_settings({"DB_STATEMENT_TIMEOUT": "0"}).command_deadline == 60.0
    assert load_settings({"DB_COMMAND_TIMEOUT": "45"}).command_deadline == 45.0
    assert load_settings({}).dead_peer_timeout == 30.0


def test_several_hosts_for_failover_are_accepted_and_named() -> None:
    url = "postgresql://u:secret@db1:5432,db2:6432,[::1]/app?target_session_attrs=read-write"
    settings = load_settings({"DATABASE_URL": url})
    assert database_hosts(url) == ["db1:5432", "db2:6432", "[::1]:5432"]
    assert "secret" not in settings.masked_database_url
