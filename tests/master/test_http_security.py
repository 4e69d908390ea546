"""HTTP side of security, in process: bearer keys, CORS, the `insecure` flag, the loopback rule."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from exo_master import serve as serve_module
from exo_master.bus.curve import is_loopback
from exo_master.bus.sockets import MasterBus
from exo_master.core import CoreConfig, MasterCore
from exo_master.http.api import build_app
from exo_master.http.auth import ApiKeyError, read_keys, secure_app
from exo_master.runtime import MasterRuntime

KEY = "sk-unit-1"


def client(keys: list[str], origins: list[str] = [], bus: MasterBus | None = None) -> TestClient:  # noqa: B006
    runtime = MasterRuntime(MasterCore(CoreConfig()), bus=bus)
    return TestClient(secure_app(build_app(runtime), keys, origins))


def test_every_route_but_health_needs_a_known_bearer_key() -> None:
    api = client([KEY, "sk-unit-2"])
    assert api.get("/health").status_code == 200
    for headers in (
        {},
        {"authorization": "Bearer nope"},
        {"authorization": KEY},
        {"authorization": f"Basic {KEY}"},
    ):
        response = api.get("/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"].startswith("Bearer")
    for key in (KEY, "sk-unit-2"):
        assert api.get("/v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200
    assert api.post("/v1/chat/completions", json={}).status_code == 401


def test_no_keys_means_no_check_and_no_cors_by_default() -> None:
    api = client([])
    response = api.get("/v1/models", headers={"origin": "https://evil.test"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_cors_answers_preflights_for_the_given_origins_only() -> None:
    api = client([KEY], ["https://app.test"])
    preflight = {"origin": "https://app.test", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}  # fmt: skip
    response = api.options("/v1/chat/completions", headers=preflight)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.test"
    denied = api.options("/v1/chat/completions", headers={**preflight, "origin": "https://evil.test"})
    assert "access-control-allow-origin" not in denied.headers
    unauthorized = api.get("/v1/models", headers={"origin": "https://app.test"})
    assert unauthorized.status_code == 401
    assert unauthorized.headers["access-control-allow-origin"] == "https://app.test"


def test_keys_file_and_bad_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# operators\nsk-a\n\n  sk-b  \n")
    assert read_keys(["sk-c", " "], path) == ["sk-c", "sk-a", "sk-b"]
    with pytest.raises(ApiKeyError):
        read_keys(["has space"], None)
    with pytest.raises(ApiKeyError, match="cannot read"):
        read_keys([], tmp_path / "missing")


def test_the_state_says_insecure_only_for_an_insecure_plaintext_bus() -> None:
    # A MasterBus is only bound by bind(): constructing one opens nothing.
    for insecure in (False, True):
        bus = MasterBus("127.0.0.1", 1, origin="m", insecure=insecure)
        try:
            state = client([], bus=bus).get("/v1/cluster/state").json()
        finally:
            bus.close()
        assert state["insecure"] is insecure


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("mac-mini.local", False)],
)  # fmt: skip
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_plaintext_outside_bus_is_refused_before_anything_binds(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_binding(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing may be bound")

    monkeypatch.setattr(serve_module, "MasterBus", no_binding)
    monkeypatch.setattr(serve_module, "_bind_http", no_binding)
    for host, bus_host in (("0.0.0.0", None), ("127.0.0.1", "0.0.0.0"), ("127.0.0.1", "10.0.0.5")):
        code = asyncio.run(serve_module.serve(CoreConfig(), host, 1, 2, bus_host=bus_host))
        assert code == 2
