"""Schema migrations: finds SPARC's alembic scripts, runs them from any working directory, and
tells where a database's schema stands against them."""

from __future__ import annotations

import enum
import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from sparc.database import DatabaseClient, QueryError

_PACKAGE_DIR = Path(__file__).resolve().parent
# PostgreSQL's undefined_table: a database never migrated has no alembic_version.
_UNDEFINED_TABLE = "42P01"


class SchemaPosition(enum.Enum):
    """Where a database's schema stands against this release's migrations."""

    BEHIND = "behind"
    AT_HEAD = "at head"
    AHEAD = "ahead"


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


@functools.cache
def _known_revisions() -> frozenset[str]:
    return frozenset(script.revision for script in _scripts().walk_revisions())


def schema_position(revision: str | None) -> SchemaPosition:
    """No revision, or one this release's migrations lead on from, is behind; a revision this
    release does not know was written by a newer one (a rolling upgrade), which is ahead."""
    if revision == head_revision():
        return SchemaPosition.AT_HEAD
    if revision is None or revision in _known_revisions():
        return SchemaPosition.BEHIND
    return SchemaPosition.AHEAD


async def schema_revision(client: DatabaseClient) -> str | None:
    """The revision the database's alembic_version holds: None when it has none (never
    migrated, or downgraded to base). One read outside any transaction, cheap enough for
    every readiness probe."""
    try:
        row = await client.fetch_one_before_transaction("SELECT version_num FROM alembic_version")
    except QueryError as exc:
        if exc.sqlstate == _UNDEFINED_TABLE:
            return None
        raise
    return None if row is None else str(row["version_num"])


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
