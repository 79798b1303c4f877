"""The route template a request was for (`/auth/sessions/{id}`), not the path it named."""

from __future__ import annotations

from typing import cast

from starlette.routing import BaseRoute, Match
from starlette.types import Scope


def route_template(scope: Scope) -> str | None:
    """The template of the route that served the request of `scope`, or that would have had it
    not been answered before routing (a 401 or a 503 while authenticating); None for a path no
    route serves."""
    matched = scope.get("route")
    if matched is None:
        matched = _route_for(scope)
    template: str | None = getattr(matched, "path", None)
    return template


def _route_for(scope: Scope) -> BaseRoute | None:
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):
        if route.matches(scope)[0] is Match.FULL:
            return cast(BaseRoute, route)
    return None
