"""Settings: defaults, parsing, and one clear line for every bad value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparc.settings import DEFAULT_DATA_DIR, Settings, SettingsError, load_settings


def test_defaults() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert settings.database_url is None
    assert (settings.pool_min_size, settings.pool_max_size) == (1, 10)
    assert (settings.pool_timeout, settings.connect_timeout) == (5.0, 5.0)
    assert settings.statement_timeout == 30.0
    assert settings.pool_max_idle == 300.0
    assert settings.statement_cache_size == 100
    assert settings.data_dir == DEFAULT_DATA_DIR


def test_every_variable_is_read() -> None:
    settings = load_settings(
        {
            "DATABASE_URL": "postgresql+asyncpg://u:p@db.example:6432/app",
            "DB_POOL_MIN_SIZE": "2",
            "DB_POOL_MAX_SIZE": "20",
            "DB_POOL_TIMEOUT": "1.5",
            "DB_CONNECT_TIMEOUT": "3",
            "DB_STATEMENT_TIMEOUT": "0",
            "DB_POOL_MAX_IDLE": "60",
            "DB_STATEMENT_CACHE_SIZE": "0",
            "SPARC_DATA_DIR": "/srv/sparc",
        }
    )
    assert settings == Settings(
        database_url="postgresql+asyncpg://u:p@db.example:6432/app",
        pool_min_size=2,
        pool_max_size=20,
        pool_timeout=1.5,
        connect_timeout=3.0,
        statement_timeout=0.0,
        pool_max_idle=60.0,
        statement_cache_size=0,
        data_dir=Path("/srv/sparc"),
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
        ("DB_POOL_TIMEOUT", "soon", "not a number of seconds"),
        ("DB_CONNECT_TIMEOUT", "-3", "more than 0"),
        ("DB_CONNECT_TIMEOUT", "inf", "more than 0"),
        ("DB_STATEMENT_TIMEOUT", "-1", "0 or more"),
        ("DB_POOL_MAX_IDLE", "nan", "0 or more"),
        ("DB_STATEMENT_CACHE_SIZE", "-5", "at least 0"),
    ],
)
def test_bad_value_names_the_variable_and_value(variable: str, value: str, complaint: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}=")
    assert complaint in message
    assert "\n" not in message


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
