"""`sparc users`: operators act on accounts from the host, by the rules of sparc.accounts.

Each command is one transaction on the service's database (DATABASE_URL, else the embedded
PostgreSQL of SPARC_DATA_DIR, joined if `sparc serve` runs on it); its audit events say they came
from the CLI. Errors are one line on stderr, with the exit codes below.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import re
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sparc import accounts
from sparc.auth import registration_fields
from sparc.database import (
    CommitFailed,
    DatabaseClient,
    DatabaseUnavailable,
    QueryError,
    bind_db_client,
)
from sparc.migrations import SchemaPosition, head_revision, schema_position, schema_revision
from sparc.problems import Problem
from sparc.security import PasswordHasher
from sparc.settings import Settings

DONE = 0
# The database cannot be reached, or its schema is behind this release (run `sparc migrate`).
DATABASE_FAILED = 1
# Bad arguments or input: an invalid email, password or time (argparse's own code, too).
BAD_INPUT = 2
NO_SUCH_ACCOUNT = 3
ACCOUNT_EXISTS = 4
# Stopped by SIGINT or SIGTERM: the transaction rolled back.
INTERRUPTED = 130

# `--until` also takes a span from now: 30m, 12h, 7d.
_SPAN = re.compile(r"^([0-9]{1,6})([mhd])$")
_SPAN_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1)}


class UsersCommandError(Exception):
    """A `sparc users` command cannot do what it was asked; the message is its one line."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def add_parser(commands: Any) -> None:
    """`sparc users ...` on the `sparc` command's subparsers."""
    users = commands.add_parser(
        "users",
        help="create, list, show, disable, enable, promote, demote or delete accounts",
        description="Act on accounts from the host, with the admin API's rules. Exit codes: "
        f"{DONE} done, {DATABASE_FAILED} database unreachable or not migrated, {BAD_INPUT} bad "
        f"arguments or input, {NO_SUCH_ACCOUNT} no account with that email, {ACCOUNT_EXISTS} "
        f"the email is taken, {INTERRUPTED} interrupted (nothing kept).",
    )
    actions = users.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create an account (the first admin: --admin)")
    create.add_argument("email")
    create.add_argument("--admin", action="store_true", help="make it an admin")
    create.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin instead of a prompt",
    )
    listing = actions.add_parser("list", help="list accounts, newest first")
    listing.add_argument("--search", help="only emails holding this text, in any letter case")
    disable = actions.add_parser("disable", help="disable an account and end its sessions")
    disable.add_argument("email")
    disable.add_argument(
        "--until",
        help="until this time (ISO 8601 with an offset, e.g. 2030-01-31T12:00:00Z) or for this "
        "long (30m, 12h, 7d); default: until enabled",
    )
    for action, summary in (
        ("show", "show an account: states, last login, live sessions"),
        ("enable", "enable a disabled account"),
        ("promote", "make an account an admin"),
        ("demote", "make an admin an ordinary account"),
        ("delete", "erase an account: its row, sessions and tokens; audit events pseudonymised"),
    ):
        actions.add_parser(action, help=summary).add_argument("email")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run `sparc users ACTION`; its exit code."""
    try:
        until = _until(args.until) if args.action == "disable" else None
        password = _password(args) if args.action == "create" else None
        output = asyncio.run(_run(args, settings, until=until, password=password))
    except KeyboardInterrupt:
        return INTERRUPTED
    except UsersCommandError as exc:
        print(f"sparc: users {args.action}: {exc}", file=sys.stderr)
        return exc.exit_code
    except (DatabaseUnavailable, CommitFailed) as exc:
        print(f"sparc: users {args.action}: {exc}", file=sys.stderr)
        return DATABASE_FAILED
    # Printed once committed: what it says has happened.
    print(output)
    return DONE


def _until(text: str | None) -> datetime | None:
    if text is None:
        return None
    span = _SPAN.match(text)
    if span is not None:
        return datetime.now(UTC) + int(span.group(1)) * _SPAN_UNITS[span.group(2)]
    try:
        return accounts.parse_until(text)
    except ValueError as exc:
        raise UsersCommandError(f"--until {exc}", BAD_INPUT) from None


def _password(args: argparse.Namespace) -> str:
    """The new account's password: stdin's first line, or typed twice at a prompt."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise UsersCommandError(
            "no terminal to prompt for the password on: pass --password-stdin", BAD_INPUT
        )
    password = getpass.getpass("Password: ")
    if getpass.getpass("Password again: ") != password:
        raise UsersCommandError("the two passwords differ", BAD_INPUT)
    return password


async def _run(
    args: argparse.Namespace, settings: Settings, *, until: datetime | None, password: str | None
) -> str:
    # One connection is all a command needs.
    settings = dataclasses.replace(settings, pool_min_size=1, pool_max_size=1)
    async with DatabaseClient(settings, application_name="sparc-users") as client:
        position = schema_position(await schema_revision(client))
        if position is SchemaPosition.BEHIND:
            raise UsersCommandError(
                f"the schema of {client.settings.masked_database_url} is behind this release's "
                f"{head_revision()}: run `sparc migrate` first",
                DATABASE_FAILED,
            )
        with bind_db_client(client):
            try:
                async with client.transaction():
                    return await _ACTIONS[args.action](args, settings, until, password)
            except QueryError as exc:
                raise UsersCommandError(str(exc), DATABASE_FAILED) from None


async def _account(email: str) -> uuid.UUID:
    found = await accounts.account_id(email)
    if found is None:
        raise UsersCommandError(f"no account has the email {email!r}", NO_SUCH_ACCOUNT)
    return found


async def _create(
    args: argparse.Namespace, settings: Settings, until: datetime | None, password: str | None
) -> str:
    try:
        email, valid_password = registration_fields({"email": args.email, "password": password})
    except Problem as exc:
        reasons = "; ".join(f"{e['field']} {e['message']}" for e in exc.errors or ())
        raise UsersCommandError(reasons or exc.detail, BAD_INPUT) from None
    password_hash = await PasswordHasher.from_settings(settings).hash(valid_password)
    # The operator on the host vouches for the address: with SPARC_REQUIRE_VERIFIED_EMAIL the
    # first admin could not log in otherwise, and no verification mail is sent from here.
    row = await accounts.create_account(email, password_hash, is_admin=args.admin, verified=True)
    if row is None:
        raise UsersCommandError(f"an account with the email {email!r} exists", ACCOUNT_EXISTS)
    await accounts.record_creation(row["id"], accounts.CLI)
    return f"created {'admin ' if args.admin else ''}{row['email']} ({row['id']})"


async def _list(
    args: argparse.Namespace, settings: Settings, until: datetime | None, password: str | None
) -> str:
    lines = [f"{'id':36}  {'created':32}  admin  disabled  email"]
    after = None
    while True:
        page, after = await accounts.list_accounts(
            search=args.search, limit=accounts.PAGE_SIZE_MAX, after=after
        )
        lines += [
            f"{user['id']:36}  {user['created_at']:32}  {_yes(user['is_admin']):5}  "
            f"{_yes(user['disabled']):8}  {user['email']}"
            for user in page
        ]
        if after is None:
            return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


async def _show(
    args: argparse.Namespace, settings: Settings, until: datetime | None, password: str | None
) -> str:
    detail = await accounts.account_detail(
        await _account(args.email), idle_timeout=settings.token_idle_timeout
    )
    assert detail is not None  # found in this transaction
    return "\n".join(
        f"{key}: {_yes(value) if isinstance(value, bool) else '-' if value is None else value}"
        for key, value in detail.items()
    )


async def _disable(
    args: argparse.Namespace, settings: Settings, until: datetime | None, password: str | None
) -> str:
    revoked = await accounts.disable(await _account(args.email), accounts.CLI, until=until)
    when = f"until {until.isoformat()}" if until else "until enabled"
    return f"disabled {args.email} {when}; {revoked} sessions revoked"


Action = Callable[[argparse.Namespace, Settings, datetime | None, str | None], Awaitable[str]]


def _simple(change: Callable[[uuid.UUID], Awaitable[object]], done: str) -> Action:
    async def action(
        args: argparse.Namespace, settings: Settings, until: datetime | None, password: str | None
    ) -> str:
        await change(await _account(args.email))
        return f"{done} {args.email}"

    return action


_ACTIONS: dict[str, Action] = {
    "create": _create,
    "list": _list,
    "show": _show,
    "disable": _disable,
    "enable": _simple(lambda user: accounts.enable(user, accounts.CLI), "enabled"),
    "promote": _simple(
        lambda user: accounts.set_admin(user, accounts.CLI, is_admin=True), "promoted"
    ),
    "demote": _simple(
        lambda user: accounts.set_admin(user, accounts.CLI, is_admin=False), "demoted"
    ),
    "delete": _simple(lambda user: accounts.erase(user, accounts.CLI), "erased"),
}
