"""Smoke test of scripts/bench_worker.py: --quick runs both targets on the tiny model and writes valid JSON.

No timing is asserted (timings belong to the benchmark itself); only the report's shape and sanity.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.mlx]
ROOT = Path(__file__).resolve().parents[2]


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_worker", ROOT / "scripts" / "bench_worker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_writes_a_valid_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load_script()
    out = tmp_path / "worker.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == bench.SCHEMA
    assert report["quick"] is True
    assert report["machine"]["mlx_lm"] and report["machine"]["cpu_count"]
    (model,) = report["models"]
    assert model["model"] == "tiny"
    assert set(model["targets"]) == {"exo", "mlx_lm.server"}
    for target in model["targets"].values():
        assert set(target["concurrency"]) == {"1", "4", "8"}
        for c, figures in target["concurrency"].items():
            # The tiny model never stops early when greedy: every request generates max_tokens.
            assert figures["tokens_per_burst"] == int(c) * model["max_tokens"]
            assert figures["tokens_per_s"] > 0 and figures["ttft_p50_s"] > 0
            assert 0 < figures["first_last_ratio"] <= 1
        assert target["shared_prefix"]["ratio"] > 0
    assert set(model["ratios"]) >= {
        "tokens_per_s_c4_exo_over_mlx",
        "first_last_c4_exo",
        "shared_prefix_ttft_exo",
    }
    assert "| tiny | exo | 4 |" in capsys.readouterr().out


def test_unknown_model_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        _load_script().main(["--models", "gpt-5"])
    assert info.value.code == 2
