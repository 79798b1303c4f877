"""A FastAPI application on SPARC's database layer: one bounded pool, a transaction per request.

Run it (without DATABASE_URL it starts SPARC's embedded PostgreSQL):

    DATABASE_URL=postgresql://app@db/app uvicorn --factory examples.fastapi_app:create_app

The rules of SPARC's DatabaseMiddleware hold here as in SPARC itself (tests/test_fastapi.py):

- every query of a request, in the endpoint, its dependencies and the child tasks it starts,
  runs on one pooled connection, taken at the first query, in one transaction;
- that transaction commits just before the status line goes out when the status is below 400
  and the client is still connected; it rolls back on an exception, on any 4xx or 5xx (an
  HTTPException or a validation error too: FastAPI turns them into the answer the middleware
  sees), and when the client went away or the request was cancelled;
- a request that finds every connection busy for DB_POOL_TIMEOUT is answered 503 with
  Retry-After (an application/problem+json document), never left hanging.

What FastAPI adds to know about:

- A dependency with `yield` ends, by default, after the response was sent: its code after
  `yield` runs after the commit (or rollback), so its queries run outside the request's
  transaction, each committed on its own, whatever the status was. Give it
  `Depends(..., scope="function")` to end it before the response, inside the transaction.
- A dependency's queries run before FastAPI checks the body: a request whose body is invalid
  answers 422, and what its dependencies wrote is rolled back.
- The DatabaseClient's methods are coroutines: endpoints and dependencies that query are
  `async def` (a plain `def` runs in a worker thread).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel, Field

from sparc.database import DatabaseClient, DatabaseMiddleware, UniqueViolation, get_db_client
from sparc.settings import Settings, load_settings

# The example's one table. A real application creates its schema with migrations (alembic).
SCHEMA = "CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, body text NOT NULL UNIQUE)"


class NewNote(BaseModel):
    body: str = Field(min_length=1, max_length=1000)


class Note(BaseModel):
    id: int
    body: str


class Summary(BaseModel):
    count: int
    longest: str | None


async def existing_note(note_id: int) -> Note:
    """A dependency: the note the path names, read in the request's transaction, or 404."""
    row = await get_db_client().fetch_one(
        "SELECT id, body FROM notes WHERE id = :id", {"id": note_id}
    )
    if row is None:
        raise HTTPException(404, f"no note {note_id}")
    return Note(id=row["id"], body=row["body"])


ExistingNote = Annotated[Note, Depends(existing_note)]


async def insert_note(note: NewNote) -> Note:
    try:
        note_id = await get_db_client().execute(
            "INSERT INTO notes (body) VALUES (:body) RETURNING id", {"body": note.body}
        )
    except UniqueViolation:
        # A 4xx: the middleware rolls back whatever this request wrote before.
        raise HTTPException(409, f"a note {note.body!r} exists already") from None
    return Note(id=note_id, body=note.body)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app, with one DatabaseClient (and so one pool) for all its requests."""
    client = DatabaseClient(settings or load_settings())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with client:  # opens the pool; closes it at shutdown
            await client.execute(SCHEMA)
            yield

    app = FastAPI(title="Notes on SPARC's database layer", lifespan=lifespan)
    # Outside FastAPI's own exception handling, so it sees the answer an HTTPException became.
    app.add_middleware(DatabaseMiddleware, client=client)

    @app.post("/notes", status_code=201)
    async def create_note(note: NewNote) -> Note:
        return await insert_note(note)

    @app.post("/notes/batch", status_code=201)
    async def create_notes(notes: list[NewNote]) -> list[Note]:
        """All or nothing: a duplicate anywhere answers 409, and none of the batch is kept."""
        return [await insert_note(note) for note in notes]

    @app.get("/notes")
    async def list_notes() -> list[Note]:
        rows = await get_db_client().fetch_all("SELECT id, body FROM notes ORDER BY id")
        return [Note(id=row["id"], body=row["body"]) for row in rows]

    @app.get("/notes/summary")
    async def summarize_notes() -> Summary:
        # Two child tasks: they share the request's connection and transaction, so both see
        # the same snapshot of the table.
        db = get_db_client()
        count, longest = await asyncio.gather(
            db.fetch_val("SELECT count(*) FROM notes"),
            db.fetch_val("SELECT body FROM notes ORDER BY length(body) DESC, id LIMIT 1"),
        )
        return Summary(count=count, longest=longest)

    @app.get("/notes/{note_id}")
    async def read_note(note: ExistingNote) -> Note:
        return note

    @app.delete("/notes/{note_id}", status_code=204)
    async def delete_note(note: ExistingNote) -> None:
        await get_db_client().execute("DELETE FROM notes WHERE id = :id", {"id": note.id})

    return app
