"""One node against 2- and 3-way shards of the same model: TTFT, decode tokens/s, and exactness.

    python scripts/bench_sharding.py      # SmolLM2: single, tensor:3, pipeline:2, pipeline:3
    python scripts/bench_sharding.py --model tiny --configs single,pipeline:2 --out /tmp/s.json

Every configuration answers the same prompts greedily through `exo_worker.distributed.generate`
(rank processes on loopback, MLX ring); each sharded answer is compared with the single-node one.
Results go to bench/results/sharding.json (with the machine and its load average, which matters:
a collective waits for the slowest rank, and on a shared 2-core machine that is often a rank the
scheduler has not run yet).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import typer
from benchkit.procs import ROOT, load_average, machine_info

sys.path.insert(0, str(ROOT))
from tests.support.tiny_model import build_tiny_model

PROMPTS = ("What is the capital of France?", "Name three colours.")


def _free_ports(count: int) -> list[int]:
    from exo_master.devtools.ports import free_ports

    return free_ports(count)


def run_config(model: str, config: str, max_tokens: int) -> dict[str, Any]:
    generate = [sys.executable, "-m", "exo_worker.distributed.generate", "--model", model]
    ask = [a for p in PROMPTS for a in ("--prompt", p)] + ["--max-tokens", str(max_tokens)]
    followers: list[subprocess.Popen[bytes]] = []
    if config != "single":
        sharding, _, k = config.partition(":")
        *ports, control = _free_ports(int(k) + 1)
        hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
        generate += ["--hosts", hosts, "--control", f"127.0.0.1:{control}", "--sharding", sharding]
        generate += ["--loss-timeout", "60"]  # a busy shared machine must not look like a lost rank
        for rank in range(1, int(k)):
            followers.append(
                subprocess.Popen([*generate, "--rank", str(rank)], stderr=subprocess.DEVNULL, cwd=ROOT)
            )
        generate += ["--rank", "0"]
    try:
        lead = subprocess.run([*generate, *ask], capture_output=True, timeout=1800, check=False, cwd=ROOT)
    finally:
        for proc in followers:  # rank 0 closed the instance; these end by themselves
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if lead.returncode != 0:
        raise RuntimeError(f"{config}: rank 0 exited {lead.returncode}: {lead.stderr.decode()[-500:]}")
    lines = [json.loads(line) for line in lead.stdout.decode().splitlines()]
    answers = [line for line in lines if "text" in line]
    return {
        "config": config,
        "load_s": lines[0]["loaded_s"],
        "ttft_s": [a["ttft_s"] for a in answers],
        "decode_tokens_per_s": [a["decode_tokens_per_s"] for a in answers],
        "texts": [a["text"] for a in answers],
    }


def main(
    model: str = typer.Option("smollm2", help="smollm2, tiny, or a model directory"),
    configs: str = typer.Option("single,tensor:3,pipeline:2,pipeline:3"),
    max_tokens: int = typer.Option(24),
    out: Path = typer.Option(ROOT / "bench" / "results" / "sharding.json"),
) -> None:
    with tempfile.TemporaryDirectory(prefix="exo-shard-bench-") as tmp:
        path = str(build_tiny_model(Path(tmp) / "tiny")) if model == "tiny" else model
        results = []
        for config in configs.split(","):
            typer.echo(f"==> {config}", err=True)
            results.append(run_config(path, config, max_tokens))
    single = next((r for r in results if r["config"] == "single"), None)
    typer.echo(f"{'config':<12} {'load s':>7} {'TTFT s':>8} {'tok/s':>7}  same text as one node")
    for r in results:
        if single is not None:
            r["same_as_single"] = r["texts"] == single["texts"]
        ttft = sum(r["ttft_s"]) / len(r["ttft_s"])
        speeds = [s for s in r["decode_tokens_per_s"] if s]
        tps = sum(speeds) / len(speeds) if speeds else 0.0
        same = r.get("same_as_single", "-")
        typer.echo(f"{r['config']:<12} {r['load_s']:>7.1f} {ttft:>8.2f} {tps:>7.2f}  {same}")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": model,
        "prompts": list(PROMPTS),
        "max_tokens": max_tokens,
        "results": results,
        "machine": machine_info(),
        "load_average": load_average(),
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(f"wrote {out}", err=True)


if __name__ == "__main__":
    typer.run(main)
