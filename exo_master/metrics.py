"""Placeholder replaced by the metrics module (issue 5)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from exo_master.runtime import MasterRuntime


def metrics_route(runtime: MasterRuntime) -> Route:
    async def metrics(request: Request) -> Response:
        return PlainTextResponse("")

    return Route("/metrics", metrics, methods=["GET"])
