"""SQL as SPARC sends it: `:name` text or SQLAlchemy Core turned into `$n` SQL, the BEGIN text,
the session settings, and which statements may change a session."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.sql import ClauseElement

Query = str | ClauseElement
Values = Mapping[str, Any]

# As in SQLAlchemy's text(), ":name" is a parameter unless escaped as "\:" or glued to a word or
# another colon (so '10:30' and "::type" are left alone); unlike text(), ":name::type" works.
_NAMED_PARAMETER = re.compile(r"(?<![:\w\\]):(\w++)(?!:(?!:))")
# Only SQLAlchemy's compiler for the `$n` parameter style; it does not import the driver.
_DIALECT = PGDialect_asyncpg()  # type: ignore[no-untyped-call]


@functools.lru_cache(maxsize=2048)
def compile_text(sql: str) -> tuple[str, tuple[str, ...]]:
    """`sql` with `:name` parameters numbered `$1, $2, ...`, and the names in that order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _NAMED_PARAMETER.sub(number, sql).replace("\\:", ":"), tuple(names)


def prepare(query: Query, values: Values | None) -> tuple[str, list[Any]]:
    """The `$n` SQL of `query` and its arguments in order."""
    if isinstance(query, str):
        sql, names = compile_text(query)
        given = values or {}
        missing = [name for name in names if name not in given]
        if missing:
            raise ValueError(f"no value given for query parameter(s) {', '.join(missing)}")
        return sql, [given[name] for name in names]
    clause: Any = query
    if values:
        clause = clause.values(**values)  # as in databases: values fill an INSERT or UPDATE
    compiled = clause.compile(dialect=_DIALECT, compile_kwargs={"render_postcompile": True})
    params = compiled.params
    return compiled.string, [params[name] for name in compiled.positiontup or ()]


# Statements whose effect can outlive their transaction: session settings, LISTEN, cursors WITH
# HOLD, prepared statements, temporary tables, session advisory locks, and anonymous blocks or
# procedures that could do any of these. Functions called from a query are not looked into.
_SESSION_CHANGE = re.compile(
    r"(?:^|;)\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*"
    r"(?:set(?!\s+(?:local|transaction|constraints)\b)|reset|listen|declare|prepare|load|discard"
    r"|do|call|create\s+(?:(?:global|local)\s+)?temp(?:orary)?)\b"
    r"|\b(?:set_config|pg_(?:try_)?advisory_lock(?:_shared)?)\s*\(",
    re.IGNORECASE | re.DOTALL,
)


@functools.lru_cache(maxsize=2048)
def changes_session(sql: str) -> bool:
    """Whether `sql` may leave state in the session that the next user of the connection sees."""
    return _SESSION_CHANGE.search(sql) is not None


ISOLATION_LEVELS = {
    "read_committed": "READ COMMITTED",
    "repeatable_read": "REPEATABLE READ",
    "serializable": "SERIALIZABLE",
}


def timeout_settings(
    *, statement_timeout: float, idle_in_transaction_timeout: float
) -> dict[str, str]:
    """PostgreSQL's timeout settings in milliseconds; a timeout of 0 (off) is left out."""
    timeouts = {}
    for name, seconds in (
        ("statement_timeout", statement_timeout),
        ("idle_in_transaction_session_timeout", idle_in_transaction_timeout),
    ):
        if seconds:
            timeouts[name] = str(math.ceil(seconds * 1000))
    return timeouts


def begin_statement(isolation: str | None, local_settings: Mapping[str, str]) -> str:
    """BEGIN at `isolation` ("serializable", "repeatable_read", "read_committed" or None for the
    server's default), followed by `SET LOCAL` of each of `local_settings`."""
    sql = "BEGIN"
    if isolation is not None:
        level = ISOLATION_LEVELS.get(isolation.lower().replace(" ", "_"))
        if level is None:
            raise ValueError(f"unknown isolation level {isolation!r}")
        sql += f" ISOLATION LEVEL {level}"
    # Sent with BEGIN as one simple query: no extra round trip, and the settings last exactly
    # as long as the transaction (behind PgBouncer, on whichever server connection runs it).
    return sql + "".join(f"; SET LOCAL {name} = {value}" for name, value in local_settings.items())
