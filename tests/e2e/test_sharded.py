"""One instance over several rank processes (MLX ring on loopback), on tiny offline llamas.

- the greedy answers of a tensor-sharded instance (3 ranks, the prompts batched together) equal the
  single-node answers;
- through a master, a pipeline-sharded instance (3 ranks, a layer each) answers like one node; a
  cancelled stream frees every rank (the next answer is still exact); a rank killed mid-stream ends
  the stream with a clean error and every other rank exits.
SmolLM2 (tensor 3, pipeline 2) is compared the same way by scripts/bench_sharding.py (make bench).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from exo_master.devtools.ports import free_ports
from exo_worker.mlx_engine import MlxEngine
from protocol.ids import ModelId
from protocol.messages import ChatMessage, TextGenerationParams
from tests.e2e.conftest import ClusterFactory
from tests.support.tiny_model import build_tiny_model

pytestmark = [pytest.mark.e2e, pytest.mark.mlx]

PROMPTS = ["What is the capital of France?", "Hello, world!", "Small models are fast"]
EXIT_RANK_LOST, EXIT_RANK_FAILED = 3, 4


@pytest.fixture(scope="module")
def tiny3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 heads, 3 KV heads, intermediate 192: splits 3 ways by tensor; 3 layers.

    Its embedding is stored in float16 (the rest float32), like SmolLM2's quantized one: the
    hidden state entering a layer is then not of the embedding's dtype, which a pipeline stage
    receiving activations must get right."""
    import mlx.core as mx

    shape = {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 96}
    directory = build_tiny_model(
        tmp_path_factory.mktemp("tiny3") / "tiny3",
        whole_characters=True,
        intermediate_size=192,
        num_hidden_layers=3,
        **shape,
    )
    weights = mx.load(str(directory / "model.safetensors"))
    assert isinstance(weights, dict)
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"].astype(mx.float16)
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})
    return directory


def single_node(model: Path, prompts: list[str], max_tokens: int) -> list[str]:
    engine = MlxEngine(model, max_batch=4, prompt_cache_bytes=0)

    async def answer(prompt: str) -> str:
        pieces: list[str] = []
        params = TextGenerationParams(
            model=ModelId("m"),
            messages=(ChatMessage(role="user", content=prompt),),
            max_tokens=max_tokens,
            temperature=0.0,
        )
        await engine.run(params, pieces.append, threading.Event())
        return "".join(pieces)

    async def main() -> list[str]:
        await engine.load()
        return [await answer(p) for p in prompts]

    try:
        return asyncio.run(main())
    finally:
        engine.close()


def ring(k: int) -> tuple[list[str], str, str]:
    """The flags of a k-rank ring, its hosts, and a control address apart from them."""
    *ports, control = free_ports(k + 1)
    hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
    return ["--hosts", hosts, "--control", f"127.0.0.1:{control}"], hosts, f"127.0.0.1:{control}"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:  # only ours, by PID
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def sharded_answers(
    processes: list[subprocess.Popen[bytes]], model: Path, sharding: str, k: int, max_tokens: int
) -> list[str]:
    args, _, _ = ring(k)
    common = [sys.executable, "-m", "exo_worker.distributed.generate", "--model", str(model), *args]
    common += ["--sharding", sharding, "--loss-timeout", "5", "--join-timeout", "120"]
    for rank in range(1, k):
        processes.append(subprocess.Popen([*common, "--rank", str(rank)], stderr=subprocess.DEVNULL))
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    lead = subprocess.run(
        [*common, "--rank", "0", *prompts, "--max-tokens", str(max_tokens), "--concurrent"],
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert lead.returncode == 0, lead.stderr.decode()[-2000:]
    lines = [json.loads(line) for line in lead.stdout.decode().splitlines()]
    for follower in processes:  # rank 0 closed the instance: every follower ends, cleanly
        assert follower.wait(timeout=15) == 0
    return [line["text"] for line in lines if "text" in line]


def test_tensor_parallel_three_ways_answers_like_one_node(
    tiny3_dir: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    expected = single_node(tiny3_dir, PROMPTS, 12)
    assert all(expected)
    assert sharded_answers(processes, tiny3_dir, "tensor", 3, 12) == expected


def test_pipeline_three_ways_through_the_master_cancels_and_survives_nothing_when_a_rank_dies(
    start_cluster: ClusterFactory, tiny3_dir: Path, processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    expected = single_node(tiny3_dir, PROMPTS[:1], 12)[0]
    cluster = start_cluster(workers=0, engine="mlx", model=str(tiny3_dir), max_concurrency=4)
    _, hosts, control = ring(3)
    flags = ["--shard-hosts", hosts, "--sharding", "pipeline", "--shard-timeout", "3"]  # a layer each
    flags += ["--shard-control", control]  # not rank 0's ring port + 1: maybe taken
    for rank in (1, 2):
        log = (tmp_path / f"rank{rank}.log").open("wb")
        cmd = [sys.executable, "-m", "exo_worker.daemon", "--engine", "mlx", "--model", str(tiny3_dir)]
        processes.append(subprocess.Popen([*cmd, "--shard-rank", str(rank), *flags], stdout=log, stderr=log))
    lead = cluster.start_worker("node1", extra_args=["--shard-rank", "0", *flags])
    cluster.wait_ready(1, timeout=120)

    url = f"{cluster.api_url}/v1/chat/completions"
    body = {
        "model": tiny3_dir.name,
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": 12,
        "temperature": 0,
    }
    assert httpx.post(url, json=body, timeout=60).json()["choices"][0]["message"]["content"] == expected

    # A stream closed mid-way is cancelled: rank 0 removes it from its batch and so must every
    # follower, or the next step's collectives would not match (a hang or an error).
    long = {**body, "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", url, json=long, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    again = httpx.post(url, json=body, timeout=60)
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == expected

    # kill -9 one follower mid-stream: the client gets an error event, every other rank exits.
    with httpx.stream("POST", url, json=long, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        processes[0].kill()
        killed = time.monotonic()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert '"error"' in rest[-2] and "lost" in rest[-2]
    assert time.monotonic() - killed < 10
    # The other follower is told to abort, unless its own collective failed first.
    assert processes[1].wait(timeout=10) in {EXIT_RANK_LOST, EXIT_RANK_FAILED}
    assert lead.wait(timeout=10) == EXIT_RANK_LOST


def test_a_rank_whose_peers_never_come_gives_up_in_bounded_time(tiny_model_dir: Path) -> None:
    args, _, _ = ring(2)
    common = [sys.executable, "-m", "exo_worker.distributed.generate", "--model", str(tiny_model_dir), *args]
    common += ["--join-timeout", "1", "--sharding", "pipeline"]
    lead = subprocess.run(
        [*common, "--rank", "0", "--prompt", "hi"], capture_output=True, timeout=60, check=False
    )
    assert lead.returncode == 2 and "ranks [1] did not join within 1 s" in lead.stderr.decode()
    follower = subprocess.run([*common, "--rank", "1"], capture_output=True, timeout=60, check=False)
    assert follower.returncode == EXIT_RANK_LOST and "rank 0 never answered" in follower.stderr.decode()
