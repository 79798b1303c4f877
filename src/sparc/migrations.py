"""Schema migrations: finds SPARC's alembic scripts and runs them from any working directory."""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

_PACKAGE_DIR = Path(__file__).resolve().parent


def script_location() -> Path:
    # A wheel carries the scripts inside the package; a source checkout keeps them at its root.
    for candidate in (_PACKAGE_DIR / "_alembic", _PACKAGE_DIR.parents[1] / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError(f"SPARC's alembic scripts are missing (looked beside {_PACKAGE_DIR})")


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(script_location()))


def head_revision() -> str:
    """The revision this release's migrations end at."""
    head = _scripts().get_current_head()
    assert head is not None, "SPARC's migrations have one head"
    return head


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
