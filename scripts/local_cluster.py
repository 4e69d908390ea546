"""Start a master and N workers on this machine in one command; Ctrl-C stops them all.

    python scripts/local_cluster.py --workers 2 --engine sim
    python scripts/local_cluster.py --workers 2 --engine mlx --model smollm2 --demo 6

With --demo N it sends a burst of N concurrent chat requests once the cluster is ready and prints
which instance served each and what it answered, then keeps serving.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.table import Table

from exo_master.devtools.launcher import ClusterSpec, ClusterStartError, LocalCluster

console = Console()
DEMO_QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "What is 2 + 2?",
    "Which planet is known as the red planet?",
    "What do bees make?",
    "What is the opposite of hot?",
    "How many legs does a spider have?",
    "What is the largest ocean on Earth?",
]


async def demo_burst(api_url: str, model: str, n: int, max_tokens: int) -> None:
    async with httpx.AsyncClient(base_url=api_url, timeout=600) as client:

        async def ask(question: str) -> tuple[str, httpx.Response, float]:
            started = time.monotonic()
            body = {
                "model": model,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": max_tokens,
                "temperature": 0.0,
            }
            response = await client.post("/v1/chat/completions", json=body)
            return question, response, time.monotonic() - started

        questions = [DEMO_QUESTIONS[i % len(DEMO_QUESTIONS)] for i in range(n)]
        console.print(f"[bold]Sending a burst of {n} concurrent chat requests to {api_url}[/bold]")
        results = await asyncio.gather(*(ask(q) for q in questions))
    table = Table(title=f"Burst of {n} over the cluster")
    for column in ("#", "instance", "seconds", "question", "answer"):
        table.add_column(column, overflow="fold")
    for i, (question, response, seconds) in enumerate(results, 1):
        if response.status_code == 200:
            answer = response.json()["choices"][0]["message"]["content"].strip().replace("\n", " ")
            instance = response.headers.get("x-exo-instance", "?")
        else:
            answer, instance = f"HTTP {response.status_code}: {response.text[:120]}", "-"
        table.add_row(str(i), instance, f"{seconds:.1f}", question, answer[:160])
    console.print(table)


def main(
    workers: int = typer.Option(2, min=1, help="Worker processes to start."),
    engine: str = typer.Option("sim", help="sim (load-testing engine) or mlx (real inference)."),
    model: str = typer.Option("", help="Model name (default: sim-model for sim, smollm2 for mlx)."),
    policy: str = typer.Option("least-loaded", help="Placement policy."),
    instances: int = typer.Option(1, min=1, help="Instances per worker."),
    max_concurrency: int = typer.Option(4, min=1, help="Concurrent tasks per instance."),
    api_port: int = typer.Option(52415, help="HTTP API port."),
    bus_port: int = typer.Option(52416, help="Bus ports (this and the next)."),
    demo: int = typer.Option(0, min=0, help="Send a burst of this many requests once ready."),
    demo_max_tokens: int = typer.Option(48, min=1),
    ready_timeout: float = typer.Option(600.0, help="Seconds to wait for every instance to load."),
) -> None:
    model = model or ("smollm2" if engine == "mlx" else "sim-model")
    log_dir = Path(tempfile.mkdtemp(prefix="exo-cluster-"))
    spec = ClusterSpec(
        workers=workers,
        engine=engine,
        model=model,
        policy=policy,
        instances_per_worker=instances,
        max_concurrency=max_concurrency,
        api_port=api_port,
        bus_port=bus_port,
        log_dir=log_dir,
    )
    stop = False

    def request_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    with LocalCluster(spec) as cluster:
        console.print(f"Starting a master and {workers} {engine} worker(s) of {model!r}; logs in {log_dir}")
        console.print(f"Bus encrypted with CURVE; the cluster's keys are in {log_dir / 'keys'}")
        try:
            with console.status("waiting for every instance to be ready (model loading)..."):
                cluster.start(ready_timeout=ready_timeout)
        except (ClusterStartError, TimeoutError) as exc:
            console.print(f"[red]cluster did not start: {exc}[/red] (see the logs in {log_dir})")
            raise typer.Exit(1) from None
        console.print(f"[green]Ready.[/green] OpenAI-compatible API at {cluster.api_url}/v1")
        if demo:
            asyncio.run(demo_burst(cluster.api_url, model, demo, demo_max_tokens))
        console.print(
            f"Serving. Try: curl {cluster.api_url}/v1/chat/completions -H 'content-type: application/json' "
            f'-d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi"}}]}}\'\n'
            f"Load: exoctl --api {cluster.api_url} load --watch. Ctrl-C stops everything."
        )
        signal.signal(signal.SIGTERM, request_stop)
        try:
            while not stop:
                if cluster.master is not None and cluster.master.poll() is not None:
                    console.print("[red]the master exited[/red]")
                    break
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        console.print("Stopping...")


if __name__ == "__main__":
    typer.run(main)
