"""The dashboard in a real browser: Debian's chromium driven by playwright, against a sim cluster.

The page asks for the API key, shows both nodes alive, shows a killed worker turn dead, and
streams a chat reply piece by piece. Its forms place and delete instances through the placement
API (answered here by an in-memory stand-in with that API's shapes). With EXO_UPDATE_SCREENSHOT=1
the final screenshot is written to docs/dashboard.png (the README shows it); otherwise into the
test's temporary directory.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from exo_master.devtools.launcher import LocalCluster, wait_for
from exo_master.devtools.ports import free_port
from exo_master.http.dashboard import dashboard_routes
from tests.e2e.conftest import ClusterFactory

pytestmark = pytest.mark.e2e
CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (containers), no GPU, and nothing that talks to the internet on its own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEY = "dashboard-test-key"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def _background_load(cluster: LocalCluster, stop: threading.Event) -> None:
    """A few requests at a time, so the charts and the in-flight table have something to show."""
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 40}
    with httpx.Client(base_url=cluster.api_url, headers=cluster.headers, timeout=30) as client:
        while not stop.is_set():
            try:
                client.post("/v1/chat/completions", json=body)
            except httpx.HTTPError:
                return  # the cluster is stopping


def _unexpected(message: Any) -> str:
    """A console error, unless it is one of the two the page expects and handles: the key check's
    401 before a key is given, and the 404 of /v1/instances on a master without that API."""
    url, text = message.location.get("url", ""), message.text
    if ("/v1/cluster/state" in url and "401" in text) or ("/v1/instances" in url and "404" in text):
        return ""
    return f"console: {text} ({url})"


def test_the_dashboard_shows_nodes_a_dead_node_and_a_streamed_chat(
    start_cluster: ClusterFactory, browser: Any, tmp_path: Path
) -> None:
    cluster = start_cluster(workers=2, heartbeat_interval=0.3, api_key=KEY, sim_tokens_per_s=200)
    # The files are open (they hold no data); the data needs the key.
    assert httpx.get(cluster.api_url + "/").status_code == 200
    script = httpx.get(cluster.api_url + "/dashboard/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert httpx.get(cluster.api_url + "/dashboard/nope.js").status_code == 404
    assert httpx.get(cluster.api_url + "/v1/events").status_code == 401
    stop = threading.Event()
    loaders = [threading.Thread(target=_background_load, args=(cluster, stop)) for _ in range(3)]
    for loader in loaders:
        loader.start()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda m: problems.append(_unexpected(m)) if m.type == "error" else None)
    try:
        page.goto(cluster.api_url + "/")
        # The API wants a key: the page asks for it before showing anything.
        page.locator("#key-form").wait_for(state="visible", timeout=15_000)
        page.fill("#key-input", KEY)
        page.click("#key-form button[type=submit]")
        for node in ("node1", "node2"):
            page.locator(f'#nodes tr[data-node="{node}"][data-state="alive"]').wait_for(timeout=15_000)
        assert page.locator("#link").inner_text() == "live"

        cluster.workers["node2"].kill()  # no goodbye: only the missed heartbeats tell
        page.locator('#nodes tr[data-node="node2"][data-state="dead"]').wait_for(timeout=15_000)
        assert page.locator('#nodes tr[data-node="node1"][data-state="alive"]').count() == 1
        page.locator('#instances tr[data-instance="node2/0"] .badge.dead').wait_for(timeout=15_000)

        page.locator("#chat-model option[value=sim-model]").wait_for(state="attached", timeout=15_000)
        page.fill("#chat-input", "Tell me about the cluster")
        page.press("#chat-input", "Enter")
        reply = page.locator(".msg.assistant").last
        # Streaming: some text is on the page while the reply is still coming.
        page.wait_for_function(
            "() => { const r = [...document.querySelectorAll('.msg.assistant')].pop();"
            " return r && r.dataset.state === 'streaming' && r.textContent.length > 0; }",
            timeout=15_000,
        )
        page.locator('.msg.assistant[data-state="done"]').wait_for(timeout=30_000)
        assert len(reply.inner_text().split()) == 256  # the sim engine's words: max_tokens of them
        assert "node1/0" in page.locator("#chat-status").inner_text()
        page.wait_for_function(
            "() => document.querySelectorAll('#chart-tps path.line').length === 1", timeout=15_000
        )
        shot = SCREENSHOT if os.environ.get("EXO_UPDATE_SCREENSHOT") == "1" else tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
    finally:
        stop.set()
        page.close()
        for loader in loaders:
            loader.join(timeout=30)
    assert [p for p in problems if p] == [], problems


class FakePlacements:
    """/v1/instances as the placement API answers it, in memory: enough to drive the page's forms."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    async def list(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": list(self.rows.values())})

    async def place(self, request: Request) -> Response:
        body = await request.json()
        if body["model"] == "too-big":
            error = {"message": "1 replica(s) of 'too-big' do not fit (none would): n1: needs 90 GB"}
            return JSONResponse({"error": error}, 409)
        ident = f"{body['model']}-{len(self.rows) + 1}"
        self.rows[ident] = {
            "id": ident, "model": body["model"], "status": "loading", "managed": True,
            "replicas": body["replicas"], "ready": 0, "reason": "",
            "instances": [{"instance_id": "n1/p.0", "node_id": "n1", "state": "loading", "progress": 0.4}],
        }  # fmt: skip
        return JSONResponse(self.rows[ident], 201)

    async def delete(self, request: Request) -> Response:
        row = self.rows.pop(request.path_params["ident"])
        return JSONResponse({**row, "status": "draining"})


def test_the_instance_forms_place_and_delete_through_the_placement_api(browser: Any) -> None:
    fake = FakePlacements()

    async def events(request: Request) -> Response:
        return Response(status_code=503)  # the page keeps retrying; this test is about the forms

    app = Starlette(
        routes=[
            *dashboard_routes(),
            Route("/v1/cluster/state", lambda _: Response("{}", media_type="application/json")),
            Route("/v1/events", events),
            Route("/v1/instances", fake.list, methods=["GET"]),
            Route("/v1/instances", fake.place, methods=["POST"]),
            Route("/v1/instances/{ident}", fake.delete, methods=["DELETE"]),
        ]
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    page = browser.new_page()
    try:
        wait_for(lambda: server.started, 15, "the fake master")
        page.goto(f"http://127.0.0.1:{port}/")
        page.locator("#place-form").wait_for(state="visible", timeout=15_000)
        page.fill("#place-model", "smollm2")
        page.fill("#place-replicas", "2")
        page.click("#place-form button[type=submit]")
        row = page.locator('#placements tr[data-placement="smollm2-1"]')
        row.wait_for(timeout=15_000)
        assert "0/2" in row.inner_text() and "n1 40%" in row.inner_text()
        page.fill("#place-model", "too-big")
        page.click("#place-form button[type=submit]")
        page.wait_for_function(
            "() => document.querySelector('#place-result').textContent.includes('do not fit')", timeout=15_000
        )
        row.locator("button").click()
        row.wait_for(state="detached", timeout=15_000)
        assert fake.rows == {}
    finally:
        page.close()
        server.should_exit = True
        thread.join(timeout=30)
