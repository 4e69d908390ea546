"""Smoke test of scripts/bench_multiturn.py on the tiny model: every variant runs, the report adds up.

No timing is asserted (timings belong to the benchmark itself); only the report's shape and counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.mlx]
ROOT = Path(__file__).resolve().parents[2]


def test_a_small_multiturn_run_reports_every_variant(tmp_path: Path) -> None:
    out = tmp_path / "multiturn.json"
    chats, turns = 2, 2
    args = ["--model", "tiny", "--chats", str(chats), "--turns", str(turns), "--max-tokens", "4"]
    args += ["--concurrency", "2", "--out", str(out)]
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_multiturn.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["variants"]) == [
        "prefix-aware least-loaded",
        "prefix-aware, slack 1",
        "least-loaded",
        "round-robin",
    ]
    for name, variant in report["variants"].items():
        assert len(variant["ttft_by_turn_s"]) == turns
        cache = variant["cache"].values()
        # Every request was counted by exactly one instance's cache, as a hit or a miss.
        assert sum(c["hits"] + c["misses"] for c in cache) == chats * turns, name
        assert all(c["reused_tokens"] <= c["prompt_tokens"] for c in cache)
        assert 0 < variant["token_share_reused"] < 1  # later turns reuse something, turn 1 cannot all
        lookups = variant["affinity"]["exo_affinity_lookups_total"]
        assert (lookups > 0) == name.startswith("prefix-aware"), name
    assert "| round-robin |" in report["markdown"] and report["markdown"] in run.stdout
