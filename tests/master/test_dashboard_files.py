"""The dashboard's files: shipped in the package, every reference resolves, nothing comes from the
internet, served without a key while the API behind them keeps asking for one."""

from __future__ import annotations

import re
from importlib import resources

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from exo_master.http.auth import secure_app
from exo_master.http.dashboard import ASSET_PREFIX, dashboard_routes

STATIC = resources.files("exo_master.http") / "static"
NAMESPACES = {"http://www.w3.org/2000/svg"}  # XML namespace names, never fetched


def _files() -> dict[str, str]:
    return {f.name: f.read_text() for f in STATIC.iterdir() if f.is_file()}


def test_every_file_the_page_references_is_shipped() -> None:
    files = _files()
    referenced = set(re.findall(re.escape(ASSET_PREFIX) + r"([\w.-]+)", files["index.html"]))
    for name, text in files.items():
        if name.endswith(".js"):
            referenced |= set(re.findall(r'from "\./([\w.-]+)"', text))
    assert referenced and referenced <= set(files), referenced - set(files)
    assert {"app.js", "style.css", "api.js", "charts.js", "chat.js", "instances.js"} <= referenced


def test_nothing_is_fetched_from_the_internet() -> None:
    for name, text in _files().items():
        urls = set(re.findall(r"https?://[^\s\"'`)]+", text)) - NAMESPACES
        assert not urls, (name, urls)


async def _state(request: Request) -> Response:
    return JSONResponse({"ok": True})


def test_the_files_are_open_and_the_api_keeps_its_key() -> None:
    app = Starlette(routes=[*dashboard_routes(), Route("/v1/cluster/state", _state)])
    client = TestClient(secure_app(app, ["k"], []))
    page = client.get("/")
    assert page.status_code == 200 and "exo cluster" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/dashboard/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/dashboard/missing.js").status_code == 404
    assert client.get("/v1/cluster/state").status_code == 401
    assert client.get("/v1/cluster/state", headers={"authorization": "Bearer k"}).status_code == 200
    # The open prefix never reaches an API route, however the path is spelled.
    for sneaky in ("/dashboard/../v1/cluster/state", "/dashboard/%2e%2e/v1/cluster/state"):
        response = client.get(sneaky)
        assert response.status_code in (401, 404) and "ok" not in response.text, sneaky
