"""The one route table: every endpoint declared once, with the error style of its surface.

Starlette's routes and the fast path are both derived from it, so a route cannot be registered
twice or take a different error mapper on one path than on the other. Every handler is wrapped by
`guarded`: an ApiError it raises becomes a response in its surface's shape (errors.error_payload),
whichever way the request was dispatched. A new surface (or the instances API, or the dashboard)
adds its own `ApiRoute` list to `build_app`; plain Starlette routes (a static `Mount`, say) may sit
in the same list.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from exo_master.http.errors import ApiError, ErrorStyle

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class ApiRoute:
    method: str
    path: str  # a Starlette path ("/v1/models/{model_id:path}"); hot routes must be exact
    handler: Handler
    errors: ErrorStyle = ErrorStyle.OPENAI
    # Served by FastPath, around Starlette's middleware (the completion routes: they carry the load).
    hot: bool = False

    def __post_init__(self) -> None:
        assert not (self.hot and "{" in self.path), f"a hot route needs an exact path: {self.path}"


def guarded(handler: Handler, style: ErrorStyle) -> Handler:
    async def serve(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as error:
            return error.response(style)

    return serve


def starlette_routes(table: Iterable[ApiRoute | BaseRoute]) -> list[BaseRoute]:
    routes: list[BaseRoute] = []
    seen: set[tuple[str, str]] = set()
    for entry in table:
        if not isinstance(entry, ApiRoute):
            routes.append(entry)
            continue
        key = (entry.method, entry.path)
        assert key not in seen, f"route declared twice: {entry.method} {entry.path}"
        seen.add(key)
        routes.append(Route(entry.path, guarded(entry.handler, entry.errors), methods=[entry.method]))
    return routes


def hot_routes(table: Sequence[ApiRoute | BaseRoute]) -> dict[tuple[str, str], Handler]:
    return {
        (e.method, e.path): guarded(e.handler, e.errors) for e in table if isinstance(e, ApiRoute) and e.hot
    }
