"""Schema migrations: finds SPARC's alembic scripts and runs them from any working directory."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

_PACKAGE_DIR = Path(__file__).resolve().parent


def script_location() -> Path:
    # A wheel carries the scripts inside the package; a source checkout keeps them at its root.
    for candidate in (_PACKAGE_DIR / "_alembic", _PACKAGE_DIR.parents[1] / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError(f"SPARC's alembic scripts are missing (looked beside {_PACKAGE_DIR})")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the schema up to `revision` (blocking: call it from a worker thread in async code)."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)
