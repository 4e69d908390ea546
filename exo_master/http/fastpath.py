"""The hot routes served straight from ASGI, around Starlette's per-request middleware stack.

Starlette wraps every request in ServerErrorMiddleware and ExceptionMiddleware (two extra ASGI
layers, each wrapping `send`); at saturation that was a fifth of the master's CPU. A completion
needs neither: every handler of the route table already turns its expected error (ApiError) into a
response itself (routes.guarded), and an unexpected exception still becomes a 500 from uvicorn.
Every other route goes through Starlette unchanged. Anything that must apply to every request
(authentication, say) must be applied around both, not only as Starlette middleware.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[[Request], Awaitable[Response]]


class FastPath:
    """Dispatch (method, exact path) to a handler directly; everything else to `app`."""

    def __init__(self, app: ASGIApp, routes: Mapping[tuple[str, str], Handler]) -> None:
        self.app = app
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self.routes.get((scope["method"], scope["path"]))
            if handler is not None:
                response = await handler(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
