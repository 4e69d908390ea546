"""`make bench`: every benchmark, real processes on loopback, exo-master next to sglang-router.

    python scripts/bench_all.py                 # full run: docs/BENCHMARKS.md, bench/results/*.json
    python scripts/bench_all.py --quick --out-dir /tmp/x   # smoke run with tiny counts (make test)
    python scripts/bench_all.py --only multiturn   # one part again; the rest of the page as it was
    python scripts/bench_all.py --report-only      # the page again from bench/results, no measuring

Writes OUT/docs/BENCHMARKS.md, its charts under OUT/docs/bench/, and one JSON file per benchmark
under OUT/bench/results/ (each with the machine, versions and load average). sglang-router is the
peer when installed (the `bench` extra); without it the exo side still runs and the notes say so.
If scripts/bench_worker.py exists (worker vs mlx_lm.server) its results join the same page.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer
from benchkit.balance import BalanceConfig, run_balance, run_hetero
from benchkit.mixed import MixedConfig, run_mixed
from benchkit.procs import ROOT, load_average, machine_info, router_installed
from benchkit.report import charts, markdown
from benchkit.scale import ScaleConfig, run_scale
from benchkit.speed import SpeedConfig, run_speed

WORKER_BENCH = ROOT / "scripts" / "bench_worker.py"
MULTITURN_BENCH = ROOT / "scripts" / "bench_multiturn.py"
PREFILL_GAP_BENCH = ROOT / "scripts" / "bench_prefill_gap.py"
# (model, turns in flight, reply tokens): one turn at a time every instance is idle when a turn
# arrives (affinity breaks the tie); with two in flight over two instances the chat's home is often
# the busy one. (Replies up to 64 tokens changed little: the system prompt asks for one sentence,
# so SmolLM2 stops by itself; bench/results/multiturn-smollm2-c1-t64.json, run by hand.)
MULTITURN_RUNS = (("tiny", 2, 32), ("smollm2", 1, 32), ("smollm2", 2, 32))


def _say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_worker_bench(quick: bool, out: Path) -> dict[str, Any]:
    """scripts/bench_worker.py's main(), imported by path, when another change has added it."""
    if quick:  # it has its own smoke test (tests/worker/test_bench_worker.py); keep this one short
        return {"note": "quick run: worker vs mlx_lm.server is measured by the full make bench only."}
    if not WORKER_BENCH.exists():
        return {"note": "scripts/bench_worker.py is absent: worker vs mlx_lm.server not measured."}
    cmd = [sys.executable, str(WORKER_BENCH), "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=3600)
    return worker_result(out)


def worker_result(out: Path) -> dict[str, Any]:
    """What scripts/bench_worker.py wrote at `out`, for the page."""
    found: dict[str, Any] = {"note": f"scripts/bench_worker.py wrote nothing at {out}."}
    if out.exists():
        text = out.read_text()
        found = {"results_text": text, "results": None}
        try:
            found["results"] = json.loads(text)
        except json.JSONDecodeError:
            found["markdown"] = text
        if isinstance(found["results"], dict) and isinstance(found["results"].get("markdown"), str):
            found["markdown"] = found["results"]["markdown"]
    md = out.with_suffix(".md")
    if md.exists() and "markdown" not in found:
        found["markdown"] = md.read_text()
    return found


def run_multiturn_bench(quick: bool, results_dir: Path) -> dict[str, Any]:
    """scripts/bench_multiturn.py once per MULTITURN_RUNS entry, each in its own process."""
    if quick:  # real MLX workers for minutes: the full make bench only
        return {"note": "quick run: the multi-turn benchmark runs in the full make bench only."}
    found: dict[str, Any] = {}
    for model, concurrency, tokens in MULTITURN_RUNS:
        name, out = _multiturn_names(results_dir, model, concurrency, tokens)
        cmd = [sys.executable, str(MULTITURN_BENCH), "--model", model, "--concurrency", str(concurrency)]
        subprocess.run([*cmd, "--max-tokens", str(tokens), "--out", str(out)], check=True, timeout=3600)
        found[name] = json.loads(out.read_text())
    return found


def run_prefill_gap_bench(quick: bool, results_dir: Path) -> dict[str, Any]:
    """scripts/bench_prefill_gap.py (SmolLM2 on MLX, minutes on a CPU): the full make bench only."""
    if quick:
        return {"note": "quick run: the MLX prefill-gap run is measured by the full make bench only."}
    out = results_dir / "prefill_gap.json"
    subprocess.run([sys.executable, str(PREFILL_GAP_BENCH), "--out", str(out)], check=True, timeout=3600)
    return dict(json.loads(out.read_text()))


def _multiturn_names(results_dir: Path, model: str, concurrency: int, tokens: int) -> tuple[str, Path]:
    """A multi-turn run's heading on the page and its results file."""
    heading = f"{model}, {concurrency} in flight, replies up to {tokens} tokens"
    return heading, results_dir / f"multiturn-{model}-c{concurrency}-t{tokens}.json"


def earlier_result(name: str, results_dir: Path) -> dict[str, Any] | None:
    """The last results of a step that --only skipped, from bench/results (None: never run)."""
    if name == "multiturn":
        paths = dict(_multiturn_names(results_dir, *run) for run in MULTITURN_RUNS)
        return {name: json.loads(p.read_text()) for name, p in paths.items() if p.exists()} or None
    path = results_dir / f"{name}.json"
    if not path.exists():
        return None
    return worker_result(path) if name == "worker" else json.loads(path.read_text())


def configs(quick: bool) -> tuple[SpeedConfig, BalanceConfig, ScaleConfig]:
    if not quick:
        return SpeedConfig(), BalanceConfig(), ScaleConfig()
    return (
        SpeedConfig(
            latency_requests=20,
            throughput_requests=40,
            rounds=1,
            concurrencies_latency=(1,),
            concurrencies_throughput=(8,),
            memory_requests=40,
            memory_samples=2,
            heartbeat_interval=0.2,
        ),
        BalanceConfig(
            ks=(2,),
            ns=(8,),
            rounds=1,
            exo_policies=("least-loaded",),
            router_policies=("round_robin",),
            shared_prefix_exo_policies=("least-loaded",),
            shared_prefix_router_policies=(),
            tokens_per_s=200.0,
            max_tokens=4,
            hetero_n=7,
            hetero_rounds=1,
            hetero_base_tokens_per_s=1000.0,
            hetero_max_tokens=4,
            hetero_exo_policies=("least-loaded",),
            hetero_router_policies=("round_robin",),
            heartbeat_interval=0.2,
        ),
        ScaleConfig(sizes=(2, 6), cpu_window_s=0.5, requests=20, concurrency=4, heartbeat_interval=0.2),
    )


def mixed_config(quick: bool) -> MixedConfig:
    if not quick:
        return MixedConfig()
    return MixedConfig(
        instances=2,
        duration_s=2.0,
        short_every_s=0.25,
        long_every_s=2.0,
        long_words=200,
        prefill_tokens_per_s=1000.0,
        tokens_per_s=200.0,
        policies=("least-work",),
        heartbeat_interval=0.2,
    )


def main(
    quick: bool = typer.Option(False, "--quick", help="Tiny counts: a smoke test, not a measurement."),
    out_dir: Path = typer.Option(ROOT, help="Where docs/ and bench/results/ are written."),
    only: str = typer.Option(
        "",
        help="Comma-separated subset: speed,balance,hetero,scale,mixed,prefill_gap,worker,multiturn. The "
        "page keeps "
        "the other sections from their last results in bench/results.",
    ),
    report_only: bool = typer.Option(
        False, "--report-only", help="Measure nothing: rebuild the page from bench/results."
    ),
) -> None:
    everything = {"speed", "balance", "hetero", "scale", "mixed", "prefill_gap", "worker", "multiturn"}
    chosen = set() if report_only else set(only.split(",")) if only else everything
    router = router_installed()
    notes = [] if router else ["sglang-router is not installed (pip install '.[bench]'): exo side only."]
    results_dir = out_dir / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="exo-bench-"))
    _say(f"process logs in {log_dir}")
    speed_cfg, balance_cfg, scale_cfg = configs(quick)
    speed_cfg.with_router = balance_cfg.with_router = router
    meta = {
        "command": " ".join(["scripts/bench_all.py", *sys.argv[1:]]) if sys.argv[1:] else "make bench",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": quick,
        "partial": chosen != everything,
        "machine": machine_info(),
        "load_before": load_average(),
        "notes": notes,
    }
    results: dict[str, Any] = {"meta": meta}
    steps = [
        ("speed", lambda: run_speed(speed_cfg, log_dir / "speed")),
        ("balance", lambda: run_balance(balance_cfg, log_dir / "balance", router)),
        ("hetero", lambda: run_hetero(balance_cfg, log_dir / "hetero", router)),
        ("scale", lambda: run_scale(scale_cfg, log_dir / "scale")),
        ("mixed", lambda: run_mixed(mixed_config(quick), log_dir / "mixed")),
        ("prefill_gap", lambda: run_prefill_gap_bench(quick, results_dir)),
        ("worker", lambda: run_worker_bench(quick, results_dir / "worker.json")),
        ("multiturn", lambda: run_multiturn_bench(quick, results_dir)),
    ]
    for name, step in steps:
        if name not in chosen:
            earlier = None if quick else earlier_result(name, results_dir)
            if earlier is not None:
                results[name] = earlier
                notes.append(f"{name}: not re-measured in this run; its last results from bench/results.")
            continue
        _say(f"{name} ...")
        started = time.monotonic()
        results[name] = step()
        if name not in ("worker", "multiturn", "prefill_gap"):  # those write their own JSON files
            payload = {"meta": {**meta, "load_now": load_average()}, **results[name]}
            (results_dir / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
        _say(f"{name} done in {time.monotonic() - started:.0f} s")
    meta["load_after"] = load_average()
    docs = out_dir / "docs"
    pngs = charts(results, docs / "bench")
    (docs / "BENCHMARKS.md").write_text(markdown(results, "bench", pngs))
    _say(f"wrote {docs / 'BENCHMARKS.md'} and {results_dir}")


if __name__ == "__main__":
    typer.run(main)
