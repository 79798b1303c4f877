"""The peer SPARC is measured against: what a team would build instead, with fastapi-users.

FastAPI, fastapi-users and its SQLAlchemy adapter (fastapi-users-db-sqlalchemy), as their
documentation sets them up: the database token strategy (an `accesstoken` table; the bearer
token is looked up there on every request), a SQLAlchemy async engine on asyncpg whose pool is
bounded to DB_POOL_MAX_SIZE (SPARC's default, 10) with no overflow, and
POST /auth/register, POST /auth/login (a form: username, password), GET /users/me.

Passwords are hashed with fastapi-users' default (pwdlib: Argon2id with argon2-cffi's
defaults, m = 64 MiB, t = 3, p = 4, and bcrypt to verify older hashes), or, with
BENCH_PEER_HASH=sparc, with SPARC's Argon2id parameters (m = 19 MiB, t = 2, p = 1).

    BENCH_DATABASE_URL=postgresql://... uvicorn bench.fastapi_users_app:create_app --factory
"""

# No `from __future__ import annotations`: FastAPI reads the dependencies' Annotated[...]
# hints at run time, and those name functions local to create_app.
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import httpx
from fastapi import Depends, FastAPI
from fastapi_users import BaseUserManager, FastAPIUsers, UUIDIDMixin, schemas
from fastapi_users.authentication import AuthenticationBackend, BearerTransport
from fastapi_users.authentication.strategy.db import DatabaseStrategy
from fastapi_users.password import PasswordHelper
from fastapi_users_db_sqlalchemy import SQLAlchemyBaseUserTableUUID, SQLAlchemyUserDatabase
from fastapi_users_db_sqlalchemy.access_token import (
    SQLAlchemyAccessTokenDatabase,
    SQLAlchemyBaseAccessTokenTableUUID,
)
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase

from sparc.settings import Settings

ME_PATH = "/users/me"
# The same lifetime as SPARC's SPARC_TOKEN_TTL default; fastapi-users has no idle timeout.
TOKEN_LIFETIME_SECONDS = 12 * 3600


class Base(DeclarativeBase):
    pass


class User(SQLAlchemyBaseUserTableUUID, Base):
    pass


class AccessToken(SQLAlchemyBaseAccessTokenTableUUID, Base):
    pass


class UserRead(schemas.BaseUser[uuid.UUID]):
    pass


class UserCreate(schemas.BaseUserCreate):
    pass


class UserUpdate(schemas.BaseUserUpdate):
    pass


def password_helper() -> PasswordHelper:
    """fastapi-users' default hasher, or SPARC's Argon2id parameters with BENCH_PEER_HASH=sparc."""
    if os.environ.get("BENCH_PEER_HASH", "default") == "default":
        return PasswordHelper()
    sparc = Settings()
    argon2 = Argon2Hasher(
        time_cost=sparc.argon2_time_cost,
        memory_cost=sparc.argon2_memory_kib,
        parallelism=sparc.argon2_parallelism,
    )
    return PasswordHelper(PasswordHash((argon2,)))


def _sqlalchemy_url() -> str:
    url = os.environ["BENCH_DATABASE_URL"]
    return url.replace("postgresql://", "postgresql+asyncpg://", 1)


def create_app() -> FastAPI:
    engine = create_async_engine(
        _sqlalchemy_url(),
        pool_size=int(os.environ.get("DB_POOL_MAX_SIZE", "10")),
        max_overflow=0,  # bounded like SPARC's pool; SQLAlchemy's own wait (30 s) is kept
    )
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    helper = password_helper()
    secret = os.environ.get("BENCH_PEER_SECRET", "benchmark only, not a secret")

    class UserManager(UUIDIDMixin, BaseUserManager[User, uuid.UUID]):
        reset_password_token_secret = secret
        verification_token_secret = secret

    async def session() -> AsyncIterator[AsyncSession]:
        async with sessions() as opened:
            yield opened

    async def user_database(
        opened: Annotated[AsyncSession, Depends(session)],
    ) -> AsyncIterator[SQLAlchemyUserDatabase[User, uuid.UUID]]:
        yield SQLAlchemyUserDatabase(opened, User)

    async def token_database(
        opened: Annotated[AsyncSession, Depends(session)],
    ) -> AsyncIterator[SQLAlchemyAccessTokenDatabase[AccessToken]]:
        yield SQLAlchemyAccessTokenDatabase(opened, AccessToken)

    def database_strategy(
        tokens: Annotated[SQLAlchemyAccessTokenDatabase[AccessToken], Depends(token_database)],
    ) -> DatabaseStrategy[User, uuid.UUID, AccessToken]:
        return DatabaseStrategy(tokens, lifetime_seconds=TOKEN_LIFETIME_SECONDS)

    async def user_manager(
        users: Annotated[SQLAlchemyUserDatabase[User, uuid.UUID], Depends(user_database)],
    ) -> AsyncIterator[UserManager]:
        yield UserManager(users, helper)

    backend = AuthenticationBackend(
        name="database",
        transport=BearerTransport(tokenUrl="auth/login"),
        get_strategy=database_strategy,
    )
    users = FastAPIUsers[User, uuid.UUID](user_manager, [backend])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        try:
            yield
        finally:
            await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    app.include_router(users.get_auth_router(backend), prefix="/auth")
    app.include_router(users.get_register_router(UserRead, UserCreate), prefix="/auth")
    app.include_router(users.get_users_router(UserRead, UserUpdate), prefix="/users")
    return app


def bearer_token(base: str, email: str = "bench@example.org") -> str:
    """Register (if new) and log in a user of the peer through its own API."""
    password = "benchmark password"
    httpx.post(f"{base}/auth/register", json={"email": email, "password": password}, timeout=30)
    response = httpx.post(
        f"{base}/auth/login", data={"username": email, "password": password}, timeout=30
    )
    response.raise_for_status()
    token: str = response.json()["access_token"]
    return token
