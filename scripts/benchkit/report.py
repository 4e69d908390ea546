"""docs/BENCHMARKS.md and its PNG charts, from the results of one `make bench` run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TARGETS = {
    "added_p50_c1_ms": 1.0,
    "added_p99_c1_ms": 5.0,
    "throughput_c32_min_rps": 1500.0,
    "throughput_c32_vs_router": 0.7,
    "cpu_per_request_vs_router": 2.0,
    "decision_1000_vs_idle": 2.0,
}


def _f(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def verdicts(results: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(what, target, measured, met) for each of the issue's targets that this run measured."""
    out: list[tuple[str, str, str, bool | None]] = []
    speed = results.get("speed") or {}
    lat = (speed.get("latency") or {}).get("1", {}).get("exo")
    if lat:
        out.append(
            (
                "added latency p50, concurrency 1",
                "<= 1 ms",
                f"{_f(lat['added_p50_ms'], 3)} ms",
                lat["added_p50_ms"] <= TARGETS["added_p50_c1_ms"],
            )
        )
        out.append(
            (
                "added latency p99, concurrency 1",
                "<= 5 ms",
                f"{_f(lat['added_p99_ms'], 3)} ms",
                lat["added_p99_ms"] <= TARGETS["added_p99_c1_ms"],
            )
        )
    thr = (speed.get("throughput") or {}).get("32", {})
    if "exo" in thr:
        rps = thr["exo"]["throughput_rps"]
        out.append(("throughput, concurrency 32", ">= 1500 req/s", f"{_f(rps, 0)} req/s", rps >= 1500))
        if "router" in thr:
            r = _ratio(rps, thr["router"]["throughput_rps"])
            out.append(
                ("throughput vs sglang-router, c=32", ">= 0.7x", f"{_f(r)}x", r is not None and r >= 0.7)
            )
            c = _ratio(thr["exo"]["cpu_ms_per_request"], thr["router"]["cpu_ms_per_request"])
            out.append(
                ("CPU per request vs sglang-router, c=32", "<= 2x", f"{_f(c)}x", c is not None and c <= 2)
            )
    rows = (results.get("scale") or {}).get("rows") or []
    big = [r for r in rows if r["workers"] == max(r["workers"] for r in rows)] if rows else []
    if big:
        v = big[0]["decision_vs_idle"]
        out.append(
            (
                f"decision latency at {big[0]['workers']} workers vs idle",
                "<= 2x",
                f"{_f(v)}x",
                v <= TARGETS["decision_1000_vs_idle"],
            )
        )
    return out


def charts(results: dict[str, Any], out_dir: Path) -> list[str]:
    """Draw what was measured; returns the PNG file names written into out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    speed = results.get("speed") or {}
    if speed.get("latency"):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels, p50, p99 = [], [], []
        for c, per in speed["latency"].items():
            for name, v in per.items():
                if name != "direct":
                    labels.append(f"{name}\nc={c}")
                    p50.append(v["added_p50_ms"])
                    p99.append(v["added_p99_ms"])
        pos = list(range(len(labels)))
        ax.bar([x - 0.2 for x in pos], p50, 0.4, label="added p50")
        ax.bar([x + 0.2 for x in pos], p99, 0.4, label="added p99")
        ax.set_xticks(pos, labels)
        ax.set_ylabel("ms over direct")
        ax.set_title("Added latency of a 1-token request (keep-alive)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "latency.png", dpi=90)
        plt.close(fig)
        written.append("latency.png")
    if speed.get("throughput"):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        cs = list(speed["throughput"])
        for i, name in enumerate(sorted({n for per in speed["throughput"].values() for n in per})):
            xs = [j + (i - 0.5) * 0.4 for j in range(len(cs))]
            a1.bar(xs, [speed["throughput"][c][name]["throughput_rps"] for c in cs], 0.4, label=name)
            a2.bar(xs, [speed["throughput"][c][name]["cpu_ms_per_request"] or 0 for c in cs], 0.4, label=name)
        for ax, title in ((a1, "req/s"), (a2, "CPU ms per request")):
            ax.set_xticks(range(len(cs)), [f"c={c}" for c in cs])
            ax.set_title(title)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "throughput.png", dpi=90)
        plt.close(fig)
        written.append("throughput.png")
    rows = (results.get("balance") or {}).get("rows") or []
    if rows:
        fig, ax = plt.subplots(figsize=(9, 3.8))
        shapes = sorted({(r["k"], r["n"]) for r in rows})
        systems = sorted({f"{r['system']}:{r['policy']}" for r in rows})
        width = 0.8 / max(1, len(systems))
        for i, sysname in enumerate(systems):
            ys = []
            for k, n in shapes:
                hit = [
                    r
                    for r in rows
                    if (r["k"], r["n"]) == (k, n) and f"{r['system']}:{r['policy']}" == sysname
                ]
                ys.append(hit[0]["mean_max"] / hit[0]["ideal"] if hit else 0)
            ax.bar([j + i * width for j in range(len(shapes))], ys, width, label=sysname)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], [f"k={k}\nN={n}" for k, n in shapes])
        ax.set_ylabel("max per instance / ceil(N/k)")
        ax.set_title("Burst balance (mean over rounds; 1.0 is perfect)")
        ax.legend(fontsize=6, ncol=3)
        fig.tight_layout()
        fig.savefig(out_dir / "balance.png", dpi=90)
        plt.close(fig)
        written.append("balance.png")
    scale = (results.get("scale") or {}).get("rows") or []
    if scale:
        fig, a1 = plt.subplots(figsize=(6, 3.5))
        ws = [r["workers"] for r in scale]
        a1.plot(ws, [r["decision_mean_us"] for r in scale], "o-", label="decision mean (us)")
        a1.set_xlabel("heartbeating workers")
        a1.set_ylabel("us")
        a2 = a1.twinx()
        a2.plot(ws, [100 * r["master_cpu_share"] for r in scale], "s--", color="tab:red", label="CPU %")
        a2.set_ylabel("master CPU % (heartbeats only)")
        a1.set_title("Heartbeat scale")
        fig.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(out_dir / "scale.png", dpi=90)
        plt.close(fig)
        written.append("scale.png")
    mem = (speed.get("memory") or {}).get("samples") or []
    if len(mem) > 1:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot([s["requests"] for s in mem], [s["rss_mb"] for s in mem], "o-")
        ax.set_xlabel("requests served")
        ax.set_ylabel("master RSS (MiB)")
        ax.set_ylim(bottom=0)
        ax.set_title("Master memory over requests")
        fig.tight_layout()
        fig.savefig(out_dir / "memory.png", dpi=90)
        plt.close(fig)
        written.append("memory.png")
    return written


def markdown(results: dict[str, Any], chart_dir: str, pngs: list[str]) -> str:
    meta = results["meta"]
    machine = meta["machine"]
    kind = "quick smoke run" if meta["quick"] else "partial run" if meta.get("partial") else "full run"
    lines = [
        "# Benchmarks: exo-master and sglang-router, side by side",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({kind}).",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['platform']}, "
        f"Python {machine['python']}. Load average before / after: {meta['load_before']} / "
        f"{meta['load_after']} (the machine is shared: other work runs alongside).",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v) + ".",
        "",
        "Everything runs as real processes on 127.0.0.1. exo-master schedules onto sim workers; "
        "sglang-router routes to mock OpenAI backends (`scripts/mock_openai.py`) with the same per-token "
        "delay. Both schedulers log at warning level. Every comparison alternates between the two "
        "(A/B/A/B) within this one run. Raw numbers: `bench/results/*.json`.",
        "",
    ]
    if meta.get("notes"):
        lines += ["Notes: " + " ".join(meta["notes"]), ""]
    table = verdicts(results)
    if table:
        lines += [
            "## Targets (issue 11)",
            "",
            "| what | target | measured | met |",
            "| --- | --- | --- | --- |",
        ]
        lines += [f"| {w} | {t} | {m} | {'yes' if ok else 'no'} |" for w, t, m, ok in table]
        lines.append("")
    speed = results.get("speed") or {}
    if speed.get("latency"):
        cfg = speed["config"]
        lines += [
            "## 3. Added latency of a 1-token request",
            "",
            f"Closed loop, keep-alive (aiohttp), {cfg['rounds']} interleaved rounds of "
            f"{cfg['latency_requests']} requests per target; {1000 / cfg['tokens_per_s']:.1f} ms per token "
            "on both sides. Added = percentile through the scheduler minus the same percentile direct to a "
            "mock backend.",
            "",
            "| concurrency | target | p50 ms | p99 ms | added p50 ms | added p99 ms |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for c, per in speed["latency"].items():
            for name, v in per.items():
                lines.append(
                    f"| {c} | {name} | {_f(v['p50_ms'], 3)} | {_f(v['p99_ms'], 3)} | "
                    f"{_f(v.get('added_p50_ms'), 3)} | {_f(v.get('added_p99_ms'), 3)} |"
                )
            if "router" in per and "exo" in per:
                r = _ratio(per["exo"]["added_p50_ms"], per["router"]["added_p50_ms"])
                lines.append(f"| {c} | exo / router | | | {_f(r)}x | |")
        lines.append("")
    if speed.get("throughput"):
        lines += [
            "## 4. Throughput and CPU per request",
            "",
            "1-token requests, closed loop. CPU is the scheduling process alone (the master; the router), "
            "from /proc/PID/stat, over the measured requests.",
            "",
            "| concurrency | target | req/s | per round | CPU ms / request |",
            "| --- | --- | --- | --- | --- |",
        ]
        for c, per in speed["throughput"].items():
            for name, v in per.items():
                lines.append(
                    f"| {c} | {name} | {_f(v['throughput_rps'], 0)} | {v['per_round_rps']} | "
                    f"{_f(v['cpu_ms_per_request'], 3)} |"
                )
            if "router" in per and "exo" in per:
                t = _ratio(per["exo"]["throughput_rps"], per["router"]["throughput_rps"])
                cpu = _ratio(per["exo"]["cpu_ms_per_request"], per["router"]["cpu_ms_per_request"])
                lines.append(f"| {c} | exo / router | {_f(t)}x | | {_f(cpu)}x |")
        lines.append("")
    bal = results.get("balance") or {}
    if bal.get("rows"):
        lines += [
            "## 1. Burst balance",
            "",
            f"N requests at once over k equal instances, {bal['config']['rounds']} rounds; the most any "
            "instance got (worst round, and mean over rounds) against ceil(N/k).",
            "",
            "| k | N | ideal | system | policy | worst | mean | per round |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in sorted(bal["rows"], key=lambda r: (r["k"], r["n"])):
            lines.append(
                f"| {r['k']} | {r['n']} | {r['ideal']} | {r['system']} | {r['policy']} | {r['worst']} | "
                f"{r['mean_max']} | {r['max_per_instance']} |"
            )
        lines.append("")
    het = results.get("hetero") or {}
    if het.get("rows"):
        lines += [
            "## 2. Unequal instances (speeds 1:2:4)",
            "",
            f"{het['n']} requests at once, one at a time per instance; the optimal makespan is "
            f"{het['optimal_s']} s.",
            "",
            "| target | median makespan s | vs optimal | rounds |",
            "| --- | --- | --- | --- |",
        ]
        for r in het["rows"]:
            lines.append(f"| {r['target']} | {r['median_s']} | {r['vs_optimal']}x | {r['makespans_s']} |")
        lines.append("")
    scale = results.get("scale") or {}
    if scale.get("rows"):
        lines += [
            "## 5. Heartbeat scale",
            "",
            "Simulated workers (one instance each) heartbeating every second from a few processes on the "
            "real protocol. CPU share: the master alone while only heartbeats flow. Decision: mean "
            "placement decision time from the master's own histogram while requests run at concurrency "
            f"{scale['config']['concurrency']}. The placement heap is the lead's part of issue 11.",
            "",
            "| workers | master CPU share | decision mean us | vs idle (2 workers) | req/s |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in scale["rows"]:
            lines.append(
                f"| {r['workers']} | {100 * r['master_cpu_share']:.1f}% | {_f(r['decision_mean_us'])} | "
                f"{_f(r['decision_vs_idle'])}x | {_f(r['throughput_rps'], 0)} |"
            )
        lines.append("")
    mem = (speed.get("memory") or {}).get("samples") or []
    if mem:
        lines += [
            "## 6. Master memory",
            "",
            f"RSS while serving {mem[-1]['requests']} requests at concurrency 32.",
            "",
            "| requests | RSS MiB |",
            "| --- | --- |",
        ]
        lines += [f"| {s['requests']} | {s['rss_mb']} |" for s in mem]
        lines.append("")
    mixed = results.get("mixed")
    if mixed and mixed.get("markdown"):
        lines += ["## Mixed prompt lengths: placement by work", "", mixed["markdown"], ""]
    gap = results.get("prefill_gap")
    if gap and gap.get("markdown"):
        lines += ["## A decoding stream while a long prompt prefills (MLX, SmolLM2)", "", gap["markdown"], ""]
    worker = results.get("worker")
    lines += ["## Worker vs mlx_lm.server", ""]
    if worker and worker.get("markdown"):
        lines += [worker["markdown"], ""]
    elif worker and worker.get("results") is not None:
        lines += ["```json", worker["results_text"], "```", ""]
    else:
        lines += [(worker or {}).get("note", "not run"), ""]
    lines += ["## Multi-turn chat: prefix-aware placement", ""]
    multiturn = results.get("multiturn") or {"note": "not run"}
    if "note" in multiturn:
        lines += [multiturn["note"], ""]
    for model, found in multiturn.items():
        if isinstance(found, dict) and "markdown" in found:
            lines += [f"### {model}", "", found["markdown"], ""]
    if pngs:
        lines += ["## Charts", ""] + [f"![{p}]({chart_dir}/{p})" for p in pngs] + [""]
    return "\n".join(lines)
