"""Typed access to what create_app puts on app.state: the one place its attribute names live."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from sparc.database import DatabaseClient
from sparc.security import PasswordHasher
from sparc.settings import Settings
from sparc.throttle import LoginThrottle

if TYPE_CHECKING:  # only for the type: sparc.metrics reads its Metrics through this module
    from sparc.metrics import Metrics


def set_app_state(
    app: Starlette,
    *,
    settings: Settings,
    db_client: DatabaseClient,
    metrics: Metrics,
    password_hasher: PasswordHasher,
    login_throttle: LoginThrottle,
) -> None:
    app.state.settings = settings
    app.state.db_client = db_client
    app.state.metrics = metrics
    app.state.password_hasher = password_hasher
    app.state.login_throttle = login_throttle


def settings_of(conn: HTTPConnection) -> Settings:
    return cast(Settings, conn.app.state.settings)


def metrics_of(conn: HTTPConnection) -> Metrics:
    return cast("Metrics", conn.app.state.metrics)


def password_hasher_of(conn: HTTPConnection) -> PasswordHasher:
    return cast(PasswordHasher, conn.app.state.password_hasher)


def login_throttle_of(conn: HTTPConnection) -> LoginThrottle:
    return cast(LoginThrottle, conn.app.state.login_throttle)
