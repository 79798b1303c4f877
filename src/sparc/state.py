"""Typed access to what create_app puts on app.state: the one place its attribute names live."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    settings: Settings = conn.app.state.settings
    return settings


def metrics_of(conn: HTTPConnection) -> Metrics:
    metrics: Metrics = conn.app.state.metrics
    return metrics


def password_hasher_of(conn: HTTPConnection) -> PasswordHasher:
    password_hasher: PasswordHasher = conn.app.state.password_hasher
    return password_hasher


def login_throttle_of(conn: HTTPConnection) -> LoginThrottle:
    login_throttle: LoginThrottle = conn.app.state.login_throttle
    return login_throttle
