"""Start a master and N workers on this machine in one command; Ctrl-C stops them all.

    python scripts/local_cluster.py --workers 2 --engine sim
    python scripts/local_cluster.py --workers 2 --engine mlx --model smollm2 --demo 6
    python scripts/local_cluster.py --workers 3 --engine mlx --place 2 --demo 6

With --place N the workers start without a model and the master places N replicas of the model
through its API (POST /v1/instances), as `exoctl instances place MODEL --replicas N` would.

With --demo N it sends a burst of N concurrent chat requests once the cluster is ready, prints a
line per answer as it arrives (which instance served it, how long it took, what it said), then
keeps serving. Ports: --api-port / --bus-port (or EXO_API_PORT / EXO_BUS_PORT); they are checked
before anything starts, so a second cluster never joins or reports on a first one. Logs go to a
temporary exo-cluster-* folder, removed on a clean exit unless --keep-logs (kept on failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.markup import escape

from exo_master.devtools.launcher import ClusterSpec, LocalCluster
from exo_master.devtools.ports import ClusterStartError, PortInUse, check_ports, suggest_ports

# soft_wrap: long lines (commands to copy) are never cut by a newline.
console = Console(highlight=False, soft_wrap=True)
DEFAULT_API_PORT, DEFAULT_BUS_PORT = 52415, 52416
EXIT_PORT_IN_USE = 2
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


def exoctl_hint(api_url: str, default_url: str) -> str:
    """How to run exoctl from a shell in this directory, exactly as it will work.

    The commands live next to this interpreter (`.venv/bin` after `make install`): when that is
    not on PATH, the hint says to activate the venv first, as the README does.
    """
    command = "exoctl" if api_url == default_url else f"exoctl --api {api_url}"
    bin_dir = Path(sys.prefix) / "bin"
    found = shutil.which("exoctl")
    if found is not None and Path(found).parent.resolve() == bin_dir.resolve():
        return f"{command} load --watch"
    activate = os.path.relpath(bin_dir / "activate")
    return f"source {activate} && {command} load --watch"


def _answer_line(done: int, n: int, question: str, response: httpx.Response, seconds: float) -> str:
    if response.status_code == 200:
        answer = " ".join(response.json()["choices"][0]["message"]["content"].split())
        instance = response.headers.get("x-exo-instance", "?")
    else:
        answer, instance = f"HTTP {response.status_code}: {response.text[:120]}", "-"
    return f"[{done}/{n}] {instance} {seconds:5.1f}s  {question} -> {answer[:160]}"


async def demo_burst(api_url: str, model: str, n: int, max_tokens: int, note: str = "") -> None:
    """Send n questions at once; print a line per answer as it arrives, then who served how many."""
    async with httpx.AsyncClient(base_url=api_url, timeout=600) as client:

        async def ask(question: str) -> tuple[str, httpx.Response, float]:
            started = time.monotonic()
            body = {
                "model": model,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": max_tokens,
                "temperature": 0.0,  # greedy: the demo answers the same every time
            }
            response = await client.post("/v1/chat/completions", json=body)
            return question, response, time.monotonic() - started

        questions = [DEMO_QUESTIONS[i % len(DEMO_QUESTIONS)] for i in range(n)]
        console.print(f"[bold]Sending a burst of {n} concurrent chat requests to {api_url}[/bold]{note}")
        started = time.monotonic()
        served: Counter[str] = Counter()
        for done, next_result in enumerate(asyncio.as_completed([ask(q) for q in questions]), 1):
            question, response, seconds = await next_result
            served[response.headers.get("x-exo-instance", "-")] += 1
            console.print(escape(_answer_line(done, n, question, response, seconds)))
    spread = ", ".join(f"{instance} {count}" for instance, count in sorted(served.items()))
    console.print(f"Burst done in {time.monotonic() - started:.1f} s; answers per instance: {spread}")


def _port_in_use(exc: PortInUse, api_port: int, bus_port: int) -> None:
    api, bus = suggest_ports(exc.host, api_port, bus_port)
    console.print(
        f"[red]error:[/red] {exc} (another exo cluster?); nothing was started. Pick free ports: "
        f"make run API_PORT={api} BUS_PORT={bus}  (or --api-port {api} --bus-port {bus}, "
        f"or EXO_API_PORT / EXO_BUS_PORT)"
    )


def main(
    workers: int = typer.Option(2, min=1, help="Worker processes to start."),
    engine: str = typer.Option("sim", help="sim (load-testing engine) or mlx (real inference)."),
    model: str = typer.Option("", help="Model name (default: sim-model for sim, smollm2 for mlx)."),
    policy: str = typer.Option("least-work", help="Placement policy."),
    instances: int = typer.Option(1, min=1, help="Instances per worker."),
    place: int = typer.Option(
        0,
        min=0,
        help="Start workers without a model and place this many replicas of it through the API "
        "(0: each worker declares the model itself).",
    ),
    max_concurrency: int = typer.Option(4, min=1, help="Concurrent tasks per instance."),
    api_port: int = typer.Option(
        DEFAULT_API_PORT, envvar="EXO_API_PORT", min=1, max=65535, help="HTTP API port."
    ),
    bus_port: int = typer.Option(
        DEFAULT_BUS_PORT, envvar="EXO_BUS_PORT", min=1, max=65534, help="Bus ports (this and the next)."
    ),
    demo: int = typer.Option(0, min=0, help="Send a burst of this many requests once ready."),
    demo_max_tokens: int = typer.Option(48, min=1),
    ready_timeout: float = typer.Option(600.0, help="Seconds to wait for every instance to load."),
    keep_logs: bool = typer.Option(False, "--keep-logs", help="Keep the log folder after a clean exit."),
) -> None:
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # `make run | tee run.log` shows each line at once
    model = model or ("smollm2" if engine == "mlx" else "sim-model")
    spec = ClusterSpec(
        workers=workers,
        engine=engine,
        model=model,
        policy=policy,
        instances_per_worker=instances,
        max_concurrency=max_concurrency,
        api_port=api_port,
        bus_port=bus_port,
        managed=place > 0,
    )
    try:
        check_ports(spec.host, api_port, bus_port)  # before anything exists: not even a log folder
    except PortInUse as exc:
        _port_in_use(exc, api_port, bus_port)
        raise typer.Exit(EXIT_PORT_IN_USE) from None
    log_dir = spec.log_dir = Path(tempfile.mkdtemp(prefix="exo-cluster-"))
    failed = _run(LocalCluster(spec), demo, demo_max_tokens, ready_timeout, log_dir, place)
    if failed:
        console.print(f"Logs kept in {log_dir}")
        raise typer.Exit(1)
    if keep_logs:
        console.print(f"Logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _run(
    cluster: LocalCluster, demo: int, demo_max_tokens: int, ready_timeout: float, log_dir: Path, place: int
) -> bool:
    """Start, demo, serve until Ctrl-C/SIGTERM; stop every process. True when something failed."""
    spec = cluster.spec
    # SIGTERM as Ctrl-C, at any stage (even while starting): the processes started so far are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    failed = False
    with cluster:
        console.print(
            f"Starting a master and {spec.workers} {spec.engine} worker(s) of {spec.model!r} "
            f"on ports {cluster.api_port} (API) and {cluster.bus_port}-{cluster.bus_port + 1} (bus); "
            f"logs in {log_dir}"
        )
        if cluster.keys is not None:
            console.print(f"Bus encrypted with CURVE; the cluster's keys are in {cluster.keys.directory}")
        with contextlib.suppress(KeyboardInterrupt):
            failed = _start_and_serve(cluster, demo, demo_max_tokens, ready_timeout, place)
        # A second Ctrl-C must not cut the stop short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        console.print("Stopping...")
    return failed


def _start_and_serve(
    cluster: LocalCluster, demo: int, demo_max_tokens: int, ready_timeout: float, place: int
) -> bool:
    spec = cluster.spec
    try:
        with console.status("waiting for every instance to be ready (model loading)..."):
            cluster.start(ready_timeout=ready_timeout)
        if place and spec.model is not None:
            console.print(f"Workers joined without a model; placing {place} replica(s) of {spec.model!r}...")
            with console.status("waiting for the placed replicas to load..."):
                placed = cluster.place(spec.model, place, timeout=ready_timeout)
            console.print(f"Placed {placed['id']} on {', '.join(placed['nodes'])} (exoctl instances list)")
    except PortInUse as exc:  # taken between the check and the start
        _port_in_use(exc, cluster.api_port, cluster.bus_port)
        return True
    except (ClusterStartError, TimeoutError) as exc:
        console.print(f"[red]cluster did not start: {exc}[/red]")
        return True
    console.print(f"[green]Ready.[/green] OpenAI-compatible API at {cluster.api_url}/v1")
    if spec.model is not None and demo:
        # SmolLM2 on 2 shared CPU cores, a burst of 6: 15 to 26 s per answer (70 s on a busy machine).
        note = " (on a CPU an answer takes 10 s to a minute; each is printed as it arrives)"
        asyncio.run(
            demo_burst(
                cluster.api_url, spec.model, demo, demo_max_tokens, note if spec.engine == "mlx" else ""
            )
        )
    default_url = f"http://127.0.0.1:{DEFAULT_API_PORT}"
    console.print(
        f"Serving. Try: curl {cluster.api_url}/v1/chat/completions -H 'content-type: application/json' "
        f'-d \'{{"model": "{spec.model}", "messages": [{{"role": "user", "content": "Hi"}}]}}\'\n'
        f"Load, from another shell in this folder: {exoctl_hint(cluster.api_url, default_url)}\n"
        "Ctrl-C stops everything."
    )
    while True:
        code = cluster.master.poll() if cluster.master is not None else None
        if code == 0:
            # Stopped on a signal: Ctrl-C in a terminal reaches every process of the group, and
            # the master may notice before this loop does. A clean stop, not a failure.
            console.print("The master stopped.")
            return False
        if code is not None:
            console.print(f"[red]the master exited with code {code}[/red]")
            return True
        time.sleep(0.5)


if __name__ == "__main__":
    typer.run(main)
