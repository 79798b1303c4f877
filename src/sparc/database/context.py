"""The context variables: which DatabaseClient and unit of work the running code belongs to."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sparc.database.client import DatabaseClient
    from sparc.database.unit import UnitOfWork

# Child tasks copy the context, so they see their request's client and unit of work too.
current_client: ContextVar[DatabaseClient | None] = ContextVar("sparc_db_client", default=None)
current_unit: ContextVar[UnitOfWork | None] = ContextVar("sparc_unit_of_work", default=None)


def get_db_client() -> DatabaseClient:
    """The DatabaseClient of the current request (the same object for every request of an app)."""
    client = current_client.get()
    if client is None:
        raise RuntimeError(
            "get_db_client() found no DatabaseClient bound here. Inside a request, add "
            "DatabaseMiddleware to the app (sparc.app.create_app does); outside requests, bind "
            "one with `with bind_db_client(client):` or use the DatabaseClient directly."
        )
    return client


@contextlib.contextmanager
def bind_db_client(client: DatabaseClient) -> Iterator[DatabaseClient]:
    """Make get_db_client() return `client` inside this block (CLI commands, jobs, tests)."""
    token = current_client.set(client)
    try:
        yield client
    finally:
        current_client.reset(token)
