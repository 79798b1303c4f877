"""The Starlette application: routes, middleware, error handlers, lifespan (pool, purge,
mail delivery)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.types import Scope

from sparc import (
    admin,
    audit,
    auth,
    docs,
    email_verification,
    health,
    identity,
    metrics,
    openapi,
    password_reset,
    retention,
    sessions,
)
from sparc.access_log import AccessLog
from sparc.database import DatabaseClient, DatabaseMiddleware
from sparc.embedded import database_settings_async
from sparc.headers import answer_headers
from sparc.logs import resolved_log_format
from sparc.mail_delivery import MailDelivery, delivering_in_background
from sparc.problems import Problem, handle_http_exception, handle_problem, handle_server_error
from sparc.proxies import TrustedProxies, TrustedProxyMiddleware
from sparc.request_ids import begin_request
from sparc.security import PasswordHasher
from sparc.settings import Settings, load_settings
from sparc.state import set_app_state
from sparc.throttle import LoginThrottle


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the app. With no settings given, they are read from the environment (and .env)."""
    if settings is None:
        settings = load_settings()
    app_metrics = metrics.Metrics()
    # One client, and so one pool, per app: every request shares it via DatabaseMiddleware.
    client = DatabaseClient(settings, events=app_metrics)
    mail_delivery = MailDelivery(client, settings, events=app_metrics)
    # Access lines are info lines: a higher SPARC_LOG_LEVEL silences them too.
    access_log = (
        AccessLog(resolved_log_format(settings.log_format))
        if settings.access_log and settings.log_level in ("debug", "info")
        else None
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # With no DATABASE_URL, the embedded PostgreSQL runs as long as the app does.
        async with database_settings_async(settings) as resolved:
            await client.connect(database_url=resolved.database_url)
            if access_log is not None:
                access_log.open()
            try:
                # Stopped before the pool closes, so a purge batch in flight rolls back cleanly
                # (and a delivery in flight stays leased, to be sent again).
                async with (
                    app_metrics.sampling(client),
                    retention.purging_in_background(client, settings, events=app_metrics),
                    delivering_in_background(mail_delivery),
                ):
                    yield
            finally:
                try:
                    await client.disconnect()
                finally:
                    if access_log is not None:
                        access_log.close()

    # Behind a load balancer the client's address comes from X-Forwarded-For, believed only
    # from SPARC_TRUSTED_PROXIES; with none configured the layer is left out altogether.
    proxies = (
        [Middleware(TrustedProxyMiddleware, proxies=TrustedProxies(settings.trusted_proxies))]
        if settings.trusted_proxies
        else []
    )
    app = Starlette(
        # Routes are matched in order: the busiest first.
        routes=[
            *auth.routes,
            *health.routes,
            *sessions.routes,
            *audit.routes,
            *password_reset.routes,
            *email_verification.routes,
            *admin.routes,
            *openapi.routes,
            *metrics.routes,
            *docs.routes,
        ],
        middleware=[
            *proxies,
            # It also gives every request its id, reports its route, status and duration to the
            # metrics and the access log, and adds the headers every answer carries.
            Middleware(
                DatabaseMiddleware,
                client=client,
                on_answered=_answered(app_metrics, access_log),
                on_arrival=_arrived,
            ),
            Middleware(
                AuthenticationMiddleware,
                backend=identity.BearerTokenBackend(idle_timeout=settings.token_idle_timeout),
                on_error=identity.authentication_failed,
            ),
        ],
        exception_handlers={
            Problem: handle_problem,
            HTTPException: handle_http_exception,
            500: handle_server_error,
        },
        lifespan=lifespan,
    )
    set_app_state(
        app,
        settings=settings,
        db_client=client,
        metrics=app_metrics,
        password_hasher=PasswordHasher.from_settings(settings),
        login_throttle=LoginThrottle(
            max_failures=settings.login_max_failures,
            account_max_failures=settings.login_account_max_failures,
            ip_max_failures=settings.login_ip_max_failures,
            registration_ip_max=settings.registration_ip_max,
            password_reset_ip_max=settings.password_reset_ip_max,
            window=settings.login_window,
        ),
    )
    return app


def _arrived(scope: Scope) -> Sequence[tuple[bytes, bytes]]:
    """A request's id, then the headers its answer carries: those of its path and its id."""
    return (*answer_headers(scope["path"]), begin_request(scope))


def _answered(
    app_metrics: metrics.Metrics, access_log: AccessLog | None
) -> Callable[[Scope, int, float], None]:
    if access_log is None:
        return app_metrics.request_answered

    def counted_and_logged(scope: Scope, status: int, seconds: float) -> None:
        app_metrics.request_answered(scope, status, seconds)
        access_log.request_answered(scope, status, seconds)

    return counted_and_logged
