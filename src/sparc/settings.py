"""Settings: every environment variable SPARC reads, parsed and validated once."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import platformdirs
from environs import Env

ALLOWED_URL_SCHEMES = ("postgresql", "postgresql+asyncpg")
DEFAULT_DATA_DIR = Path(platformdirs.user_data_dir("sparc"))


class SettingsError(ValueError):
    """A setting has a value SPARC cannot use; the message names the variable and the value."""


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
    pool_max_idle: float = 300.0
    statement_cache_size: int = 100
    data_dir: Path = DEFAULT_DATA_DIR

    def __post_init__(self) -> None:
        if self.database_url is not None:
            check_database_url(self.database_url, variable="DATABASE_URL")
        if self.pool_min_size > self.pool_max_size:
            raise SettingsError(
                f"DB_POOL_MIN_SIZE={self.pool_min_size} is larger than "
                f"DB_POOL_MAX_SIZE={self.pool_max_size}: the minimum must not exceed the maximum"
            )

    @property
    def masked_database_url(self) -> str:
        """The database URL with its password replaced, fit for logs and error messages."""
        if self.database_url is None:
            return "embedded PostgreSQL in " + str(self.data_dir)
        return mask_password(self.database_url)

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


def check_database_url(url: str, *, variable: str) -> None:
    shown = mask_password(url) if "://" in url else url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - urlsplit only validates the port when it is read
    except ValueError as exc:
        raise SettingsError(f"{variable}={shown!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ALLOWED_URL_SCHEMES:
        raise SettingsError(
            f"{variable}={shown!r} must start with postgresql:// or postgresql+asyncpg://"
        )
    if not parts.path.strip("/"):
        raise SettingsError(f"{variable}={shown!r} names no database (postgresql://host/DBNAME)")


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
        reader = _Reader(lambda name: env.str(name, None))
    else:
        reader = _Reader(environ.get)
    return Settings(
        database_url=reader.optional_str("DATABASE_URL"),
        pool_min_size=reader.integer("DB_POOL_MIN_SIZE", 1, minimum=0),
        pool_max_size=reader.integer("DB_POOL_MAX_SIZE", 10, minimum=1),
        pool_timeout=reader.seconds("DB_POOL_TIMEOUT", 5.0, allow_zero=False),
        connect_timeout=reader.seconds("DB_CONNECT_TIMEOUT", 5.0, allow_zero=False),
        statement_timeout=reader.seconds("DB_STATEMENT_TIMEOUT", 30.0, allow_zero=True),
        pool_max_idle=reader.seconds("DB_POOL_MAX_IDLE", 300.0, allow_zero=True),
        statement_cache_size=reader.integer("DB_STATEMENT_CACHE_SIZE", 100, minimum=0),
        data_dir=reader.path("SPARC_DATA_DIR", DEFAULT_DATA_DIR),
    )


class _Reader:
    """Turns raw strings into typed values, each failure a SettingsError naming the variable."""

    def __init__(self, lookup: Callable[[str], str | None]) -> None:
        self._lookup = lookup

    def _raw(self, name: str) -> str | None:
        value = self._lookup(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def optional_str(self, name: str) -> str | None:
        return self._raw(name)

    def integer(self, name: str, default: int, *, minimum: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a whole number") from None
        if value < minimum:
            raise SettingsError(f"{name}={raw!r} must be at least {minimum}")
        return value

    def seconds(self, name: str, default: float, *, allow_zero: bool) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a number of seconds") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            bound = "0 or more" if allow_zero else "more than 0"
            raise SettingsError(f"{name}={raw!r} must be a number of seconds, {bound}")
        return value

    def path(self, name: str, default: Path) -> Path:
        raw = self._raw(name)
        if raw is None:
            return default
        return Path(raw).expanduser()
