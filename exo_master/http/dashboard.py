"""The dashboard: static files shipped in the package (`static/`), served by the master at `/`.

Plain HTML, CSS and ES modules, no build step and nothing fetched from the internet (a home lab's
browser may be offline); the content security policy says so too. The files hold no data and are
served without an API key; the page asks for the key and sends it with every API call
(`/v1/events`, `/v1/cluster/state`, `/v1/chat/completions`...), which stay protected.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from exo_master.http.errors import error_body

ASSET_PREFIX = "/dashboard/"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_HEADERS = {
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
}


def _load_assets() -> dict[str, tuple[bytes, str]]:
    """Every shipped file, read once: the URL space is exactly this list (no path is ever joined)."""
    folder = resources.files("exo_master.http") / "static"
    assets = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in _TYPES:
            assets[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    assert "index.html" in assets, "the dashboard's index.html is missing from the package"
    return assets


def dashboard_routes() -> list[Route]:
    assets = _load_assets()

    async def index(request: Request) -> Response:
        body, media_type = assets["index.html"]
        return Response(body, media_type=media_type, headers=_HEADERS)

    async def asset(request: Request) -> Response:
        found = assets.get(request.path_params["name"])
        if found is None:
            return JSONResponse(
                error_body("no such dashboard file", "invalid_request_error", code="not_found"), 404
            )
        return Response(found[0], media_type=found[1], headers=_HEADERS)

    return [
        Route("/", index, methods=["GET"]),
        Route(ASSET_PREFIX + "{name}", asset, methods=["GET"]),
    ]
