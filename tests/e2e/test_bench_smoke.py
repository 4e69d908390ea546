"""`make bench --quick` as a smoke test: every benchmark runs with tiny counts and writes valid JSON.

No timing is asserted (timings go into docs/BENCHMARKS.md). sglang-router is part of the `bench`
extra, which `dev` includes; if it is missing the run covers the exo side only and notes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_quick_bench_writes_json_and_the_page(tmp_path: Path) -> None:
    pytest.importorskip("aiohttp")
    pytest.importorskip("matplotlib")
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_all.py"), "--quick", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "bench" / "results").glob("*.json")}
    assert {"speed", "balance", "hetero", "scale"} <= set(results)
    for payload in results.values():
        assert payload["meta"]["machine"]["cores"] >= 1
        assert len(payload["meta"]["load_now"]) == 3
    speed = results["speed"]
    assert speed["latency"]["1"]["exo"]["errors"] == 0
    assert speed["latency"]["1"]["exo"]["requests"] == speed["config"]["latency_requests"]
    assert speed["throughput"]["8"]["exo"]["cpu_ms_per_request"] > 0
    balance = results["balance"]["rows"]
    assert all(sum(counts) == row["n"] for row in balance for counts in row["counts"])
    assert [r["workers"] for r in results["scale"]["rows"]] == [2, 6]
    page = (tmp_path / "docs" / "BENCHMARKS.md").read_text()
    assert "## 3. Added latency" in page
    for png in (tmp_path / "docs" / "bench").glob("*.png"):
        assert png.read_bytes().startswith(b"\x89PNG")
    if "sglang-router is not installed" not in page:
        assert "router" in speed["targets"]
