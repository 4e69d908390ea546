"""A small mock OpenAI backend for benchmarks: the peer router's backend, standing in for a worker.

    python scripts/mock_openai.py --port 8001 --tokens-per-s 1000

POST /v1/chat/completions "generates" max_tokens words at the same rate and on the same absolute
schedule as the sim worker's engine (exo_worker/sim_engine.py), so exo-master over sim workers and
a router over these mocks do the same simulated work. Streams (SSE) when asked to. The GET routes a
router probes at start (health, models, server info) answer 200. No model, nothing downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from typing import Any

import msgspec
from aiohttp import web

_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder()
WORD = "token"
MAX_TOKENS_CAP = 100_000  # a mock never generates more than this, whatever it is asked


async def generate(interval: float, n: int) -> None:
    """Take `n` token times on an absolute schedule (as SimEngine._compute does)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + interval
    for _ in range(n):
        await asyncio.sleep(max(0.0, deadline - loop.time()))
        deadline = max(deadline, loop.time() - interval) + interval


def build_app(tokens_per_s: float, model: str, name: str, max_concurrency: int = 0) -> web.Application:
    """`max_concurrency` > 0: at most that many generations at once, the rest wait (in order)."""
    interval = 0.0 if math.isinf(tokens_per_s) else 1.0 / tokens_per_s
    created = int(time.time())
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency > 0 else None

    async def chat(request: web.Request) -> web.StreamResponse:
        try:
            body: dict[str, Any] = _decode.decode(await request.read())
            asked = body.get("max_completion_tokens") or body.get("max_tokens") or 16  # routers rename it
            n = max(1, min(int(asked), MAX_TOKENS_CAP))
        except (msgspec.DecodeError, TypeError, ValueError, AttributeError):
            return web.json_response({"error": {"message": "bad request", "type": "invalid"}}, status=400)
        rid = f"chatcmpl-mock-{id(request):x}"
        if body.get("stream"):
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + interval
            for i in range(n):
                await asyncio.sleep(max(0.0, deadline - loop.time()))
                deadline = max(deadline, loop.time() - interval) + interval
                delta = {"content": WORD if i == 0 else " " + WORD}
                chunk = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "model": body.get("model", model),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                }
                await response.write(b"data: " + _json.encode(chunk) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        if slots is None:
            await generate(interval, n)
        else:
            async with slots:
                await generate(interval, n)
        payload = {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", model),
            "system_fingerprint": name,  # which backend served it, for the balance benchmarks
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join([WORD] * n)},
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
        }
        return web.Response(body=_json.encode(payload), content_type="application/json")

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(request: web.Request) -> web.Response:
        data = [{"id": model, "object": "model", "created": created, "owned_by": "mock"}]
        return web.json_response({"object": "list", "data": data})

    # No model_path or tokenizer_path: given one, sglang-router tries to fetch a tokenizer from a
    # model hub. The driver also points HF_ENDPOINT at a closed loopback port, so nothing leaves.
    async def model_info(request: web.Request) -> web.Response:
        return web.json_response({"is_generation": True, "served_model_name": model})

    async def server_info(request: web.Request) -> web.Response:
        return web.json_response({"dp_size": 1, "tp_size": 1, "version": "mock"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    for path in ("/health", "/health_generate", "/liveness", "/readiness", "/"):
        app.router.add_get(path, ok)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/get_model_info", model_info)
    app.router.add_get("/model_info", model_info)
    app.router.add_get("/get_server_info", server_info)
    app.router.add_get("/server_info", server_info)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens-per-s", type=float, default=50.0)
    parser.add_argument("--model", default="sim-model")
    parser.add_argument("--max-concurrency", type=int, default=0, help="0: unlimited")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is only a speed-up
        pass
    web.run_app(
        build_app(args.tokens_per_s, args.model, f"mock-{args.port}", args.max_concurrency),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
